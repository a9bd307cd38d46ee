#include "format/plan_layout.hpp"

#include "format/pickle_writer.hpp"

#include <fmt/format.h>

namespace ckpt::detail {

Layout plan_layout(const c10::IValue& value, bool defer_device_copies) {
  Layout layout;
  std::string pickle = write_pickle(value, layout, defer_device_copies);
  std::vector<LayoutRecord> data_records;
  data_records.swap(layout.records);

  auto small = [&](std::string name, std::string bytes) {
    const std::string& kept = layout.owned.emplace_back(std::move(bytes));
    LayoutRecord r;
    r.name = std::move(name);
    r.data = kept.data();
    r.size = kept.size();
    return r;
  };
  // Order as torch.save: data.pkl, byteorder, the storages, version.
  layout.records.push_back(small(fmt::format("{}/data.pkl", kArchivePrefix), std::move(pickle)));
  layout.records.push_back(small(fmt::format("{}/byteorder", kArchivePrefix), "little"));
  // Two records (data.pkl, byteorder) now come before the storages.
  for (auto& [impl, index] : layout.record_of_storage) index += 2;
  for (auto& r : data_records) layout.records.push_back(std::move(r));
  layout.records.push_back(small(fmt::format("{}/version", kArchivePrefix), kFormatVersion));

  std::uint64_t at = 0;
  for (auto& r : layout.records) at = ZipImage::place(r, at);
  layout.cd_offset = at;
  return layout;
}

ZipImage zip_image(const Layout& layout) {
  return ZipImage(std::vector<RecordInfo>(layout.records.begin(), layout.records.end()), layout.cd_offset);
}

}  // namespace ckpt::detail
