// The DCP core's wire and file encodings: plans, write results and failures as
// they travel between ranks, and the metadata file. All JSON (Boost.JSON):
// readable, versioned, and parsed with every field checked.
#pragma once

#include <ckpt/dcp/metadata.hpp>
#include <ckpt/dcp/planner.hpp>
#include <ckpt/error.hpp>

#include "dcp/share_plan.hpp"

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace ckpt::dcp::detail {

std::string encode(const SavePlan& plan);
std::string encode(const LoadPlan& plan);
std::string encode(const std::vector<WriteResult>& results);
std::string encode(const Metadata& metadata);
std::string encode(const std::map<std::int64_t, RankFailure>& failures);
std::string encode(const ReadItem& item);
/// A rank's part of the global load plan with its share steps.
std::string encode(const SharedLoadPlan& plan);

// Each decoder throws Error "malformed <what>: ..." on bad input.
SavePlan decode_save_plan(std::string_view text);
LoadPlan decode_load_plan(std::string_view text);
std::vector<WriteResult> decode_write_results(std::string_view text);
Metadata decode_metadata(std::string_view text);
std::map<std::int64_t, RankFailure> decode_failures(std::string_view text);
SharedLoadPlan decode_shared_load_plan(std::string_view text);

/// What a rank loads, sent to the coordinator (load_state_dict).
std::string encode(const MetadataRequest& request);
MetadataRequest decode_metadata_request(std::string_view text);
/// A rank's part of the checkpoint's metadata, as the coordinator sends it:
/// everything a CheckpointMetadata holds, no check made (the coordinator
/// checked the whole when it read it; a part need not tile its tensors).
std::string encode_metadata_part(const CheckpointMetadata& metadata);
CheckpointMetadata decode_metadata_part(std::string_view text);

/// The metadata file's text: format, version, keys and storage data.
std::string encode_checkpoint_metadata(const CheckpointMetadata& metadata);
/// Parses and checks it; throws CorruptCheckpoint naming `source` and the fault
/// (unknown format, newer version, bad dtype, negative sizes, chunks out of
/// bounds, file names that leave the directory, ...).
CheckpointMetadata decode_checkpoint_metadata(std::string_view text, const std::string& source);
/// The checks every metadata gets, whichever dialect it was read from: sizes
/// and chunks within their tensor, chunks tiling each tensor, plain file names
/// and sane offsets. Throws CorruptCheckpoint naming `source`.
void check_checkpoint_metadata(const CheckpointMetadata& metadata, const std::string& source);

/// "float32", "bfloat16", ... (throws Unsupported for a dtype DCP does not save).
const char* dtype_name(c10::ScalarType dtype);
/// The item name of `index` inside a data file: "fqn" or "fqn@o0,o1".
std::string item_name(const MetadataIndex& index);

}  // namespace ckpt::dcp::detail
