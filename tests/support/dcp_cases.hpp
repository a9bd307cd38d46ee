// upstream's fault tables (test_checkpoint.py, TestDistributedFailure), shared
// by dcp_worker, which runs them, and dcp_checkpoint_test, which checks what
// every rank reported.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <vector>

namespace ckpt::test::dcp_cases {

/// One call of upstream's _test_save / _test_load: the coordinator, the fail
/// key (empty: no fault) and the ranks it fails on.
struct Case {
  std::int64_t coordinator = 0;
  std::string key;
  std::vector<std::int64_t> ranks;
  bool ignore_exception_type = false;
};

// test_save_error_handling
inline const std::vector<Case> kSaveCases{
    {0, "fail_set_up_storage_writer", {0}}, {0, "fail_finish", {0}},     {0, "fail_prepare_global_plan", {0}},
    {0, "fail_prepare_local_plan", {0}},    {0, "fail_write_data", {2}}, {0, "fail_write_data_async", {3}},
    {1, "fail_set_up_storage_writer", {1}}, {1, "fail_finish", {1}},
};
// test_save_error_handling_no_dist
inline const std::vector<Case> kSaveNoDistCases{
    {0, "fail_set_up_storage_writer", {0}}, {0, "fail_finish", {0}},     {0, "fail_prepare_global_plan", {0}},
    {0, "fail_prepare_local_plan", {0}},    {0, "fail_write_data", {0}}, {0, "fail_write_data_async", {0}},
};
// test_load_error_handling
inline const std::vector<Case> kLoadCases{
    {0, "", {}},
    {0, "fail_set_up_storage_reader", {0}},
    {0, "fail_prepare_global_plan", {0}},
    {0, "fail_read_metadata", {0}, true},
    {0, "fail_prepare_local_plan", {1}},
    {0, "fail_read_data", {3}},
    {0, "fail_read_data_async", {1}},
    {3, "fail_set_up_storage_reader", {0}},
    {1, "fail_read_metadata", {3}, true},
    {2, "fail_read_data", {0}},
    {3, "fail_read_data_async", {2}},
    {1, "fail_prepare_global_plan", {1}},
};
// test_load_error_handling_no_dist
inline const std::vector<Case> kLoadNoDistCases{
    {0, "", {}},
    {0, "fail_set_up_storage_reader", {0}},
    {0, "fail_read_metadata", {0}, true},
    {0, "fail_prepare_local_plan", {0}},
    {0, "fail_prepare_global_plan", {0}},
    {0, "fail_read_data", {0}},
    {0, "fail_read_data_async", {0}},
};

/// A case's label, also the directory a save case writes to (under DIR).
inline std::string label_of(const std::string& table, const Case& c) {
  return fmt::format("{}/c{}/{}", table, c.coordinator, c.key.empty() ? "none" : c.key);
}

}  // namespace ckpt::test::dcp_cases
