// libFuzzer target for PyTorch's DCP `.metadata` (the restricted pickle reader
// and the Metadata decoder): any input must either decode to checked metadata
// or be refused with a ckpt::Error. A crash, a sanitizer report, a hang or an
// exception of another type is a finding.
#include "dcp/torch_metadata.hpp"

#include <ckpt/error.hpp>

#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    const auto md = ckpt::dcp::detail::decode_torch_metadata(bytes, "fuzz/.metadata");
    // What decoded must encode again (the writer's side of the same classes).
    (void)ckpt::dcp::detail::encode_torch_metadata(md, ckpt::dcp::MetadataDialect::torch_2_4);
  } catch (const ckpt::Error&) {
    // refused with a clear error: the expected outcome for bad input
  }
  return 0;
}
