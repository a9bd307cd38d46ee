// The DCP core's coordination costs, and how they grow with the ranks.
//
// usage: bench_dcp [DIR [throughput|scaling|async|load]]   (default DIR $TMPDIR or
//        /tmp; no mode: every table, in one run; "throughput": table 3 only;
//        "scaling": tables 1 and 2; "async": table 4 only; "load": table 5 only)
//
// Run without RANK it is the driver and prints the tables.
//   1. 1, 2, 4, 8 and 16 local ranks (under ckpt-launch, found beside it) save
//      and load a small model state through save_state_dict/load_state_dict:
//      64 keys sharded over the ranks (16 KiB per rank each), 8 replicated
//      keys and one value. Reported: this rank's local plan and the
//      checkpoint's metadata in bytes, the time of a save and of a load, and
//      those times as multiples of a bare Gloo barrier measured in the same
//      run (the reference; the loads come after an untimed load of every
//      checkpoint: page cache warm), and the most any rank but the
//      coordinator read from storage for one load (its data: the coordinator alone reads the
//      metadata, so this stays flat as the ranks grow), and the speed of the
//      load against the same load with every rank reading the metadata
//      itself, and of the save against the same saves with upstream's plan
//      caching, one planner kept across the rounds (higher is faster).
//      Then, for the same ranks, a 16 MiB tensor every rank loads whole (saved
//      once) with each ReplicatedReads mode, the ranks taken as hosts of 4
//      (GROUP_RANK): the bytes all ranks read from storage for one load, and
//      the load's speed against every rank reading it (best of 3, the modes
//      in turns, after one untimed load each).
//   2. In this process, the coordinator's share for 16 to 10,000 ranks: the
//      local plans of N ranks are made and encoded, then decoded, merged and
//      validated (create_global_plan) and the global plans and metadata
//      encoded, as the coordinator does. Reported: bytes gathered and scattered, metadata
//      bytes, and microseconds and bytes per rank (flat means O(N)). Then the
//      load of that checkpoint: the metadata every rank read before, the
//      largest part the coordinator now cuts a rank (metadata_part), and the
//      coordinator's time to cut them all.
//   3. Throughput against Python: ~1 GiB of float32 (16 tensors of 64 MiB) saved
//      and loaded in place on one process, 5 rounds each (the best counts), by
//      ckpt (dcp::save / dcp::load, PyTorch's format, CRCs checked) and by
//      Python's FileSystemWriter / FileSystemReader of torch 2.6 (the trixie
//      chroot, when there) and torch 1.13, in the same run; reported as
//      ratios to Python 2.6. The files live in DIR (page cache warm).
//   4. The asynchronous save (dcp::AsyncSaver) on one process, 1 GiB of float32
//      (64 tensors of 16 MiB), training on one intra-op thread (the trainer's
//      core; the writer child has the other): the time the save blocks its
//      caller (until staged) against a warm memcpy of the same bytes and
//      against the synchronous dcp::save; the time until committed; training
//      steps per second while the write runs against without; and torch 2.6's
//      dcp.async_save blocking time on the same state in the same run (the
//      chroot), the peer. Best of three each; the checkpoint is read back and
//      checked.
//   5. Loads on one process of 1 GiB of float32 (8192 × 32768) saved in 4 row
//      shards: into 4 row shards (each reads one saved chunk whole) and into
//      4 column shards (each reads a strided part of every saved chunk), page
//      cache warm, best of three; then cold loads (the page cache dropped
//      first: root) against cold O_DIRECT reads of the same data files, 4 MiB
//      at a time with 4 reads in flight (threads), the disk's reference: best
//      of three each, in turns. Then 256 MiB of rows of 256 bytes, warm, into
//      4 row shards and into 4 column shards (runs of 64 bytes): as a default
//      reader does it (ranges joined, the blocks read checked against their
//      CRC-32s), unchecked, and unchecked with one read per range.
// Each measured section of table 1 starts and ends at a Gloo barrier; rank 0
// reports the slowest rank's time.
#include <ckpt/ckpt.hpp>

#include "bench_support.hpp"

#include "dcp/serialize.hpp"

#include <ATen/Parallel.h>
#include <boost/asio/thread_pool.hpp>

#include <cstring>
#include <fstream>
#include <future>
#include <thread>

#include <fcntl.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace dcp = ckpt::dcp;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kShardedKeys = 64;
constexpr int kReplicatedKeys = 8;
constexpr std::int64_t kRowsPerRank = 16;
constexpr std::int64_t kCols = 256;                 // 16 rows × 256 floats = 16 KiB per rank and key
constexpr std::int64_t kEmbeddingFloats = 4 << 20;  // 16 MiB, replicated
constexpr int kSharedRounds = 3;

using ckpt::bench::capture;
using ckpt::bench::result_of;
using ckpt::bench::timed;

dcp::DcpStateDict model_state(std::int64_t world, std::int64_t rank) {
  dcp::ChunkShardingSpec spec{0, {}};
  for (std::int64_t r = 0; r < world; ++r) spec.placements.push_back(fmt::format("rank:{}/cpu", r));
  dcp::DcpStateDict sd;
  for (int k = 0; k < kShardedKeys; ++k)
    sd.push_back({fmt::format("model.layers.{}.weight", k),
                  dcp::ShardedTensor::full(spec, {kRowsPerRank * world, kCols}, rank, k)});
  for (int k = 0; k < kReplicatedKeys; ++k)
    sd.push_back({fmt::format("model.norm.{}.bias", k), at::full({256}, float(k))});
  sd.push_back({"step", c10::IValue(static_cast<std::int64_t>(1000))});
  return sd;
}

/// A FileSystemReader that does not share its metadata: every rank reads it.
class EveryRankReads : public dcp::FileSystemReader {
 public:
  using FileSystemReader::FileSystemReader;
  bool shares_metadata() const override { return false; }
};

int rank_main(const fs::path& dir) {
  auto pg = ckpt::dist::init_process_group();
  auto& group = *pg->group;
  const auto rank = pg->rank_info.global_rank;
  const auto world = pg->rank_info.global_world_size;
  auto sd = model_state(world, rank);
  dcp::DefaultSavePlanner planner;
  planner.set_up_planner(sd, rank == 0);
  const auto plan_bytes = dcp::detail::encode(planner.create_local_plan()).size();

  constexpr int kRounds = 10;
  const double bare = timed(group, [&] {
    for (int i = 0; i < kRounds; ++i) group.barrier()->wait();
  });
  const double save = timed(group, [&] {
    for (int i = 0; i < kRounds; ++i) {
      dcp::FileSystemWriter writer(dir / fmt::format("ckpt_{}", i), {.sync_files = false});
      dcp::save_state_dict(sd, writer, nullptr, pg);
    }
  });
  // The same saves with upstream's plan caching: one planner kept across
  // them, so from the second on no rank sends its plan and the coordinator
  // reuses its global plan and metadata.
  dcp::DefaultSavePlanner caching(true, /*enable_plan_caching=*/true);
  const double save_cached = timed(group, [&] {
    for (int i = 0; i < kRounds; ++i) {
      dcp::FileSystemWriter writer(dir / fmt::format("cached_{}", i), {.sync_files = false});
      dcp::save_state_dict(sd, writer, &caching, pg);
    }
  });
  // The loads measure a warm page cache, both ways alike: the saves wrote
  // their data around it (FileSystemWriter's direct I/O), so whichever way
  // read the files first would pay for the disk.
  for (int i = 0; i < kRounds; ++i) {
    dcp::FileSystemReader reader(dir / fmt::format("ckpt_{}", i));
    dcp::load_state_dict(sd, reader, nullptr, pg);
  }
  const double load = timed(group, [&] {
    for (int i = 0; i < kRounds; ++i) {
      dcp::FileSystemReader reader(dir / fmt::format("ckpt_{}", i));
      dcp::load_state_dict(sd, reader, nullptr, pg);
    }
  });
  // The same loads with every rank reading the metadata itself (upstream's
  // way, and what a reader that does not share its metadata gets).
  const double load_every_rank = timed(group, [&] {
    for (int i = 0; i < kRounds; ++i) {
      EveryRankReads reader(dir / fmt::format("ckpt_{}", i));
      dcp::load_state_dict(sd, reader, nullptr, pg);
    }
  });
  const auto metadata_bytes = fs::file_size(dir / "ckpt_0" / dcp::kMetadataFileName);
  // What the ranks other than the coordinator read from storage for a load
  // (the most of any of them; rank 0's own when it is alone).
  dcp::FileSystemReader probe(dir / "ckpt_0");
  dcp::load_state_dict(sd, probe, nullptr, pg);
  std::vector<at::Tensor> most{
      at::full({1}, rank == 0 && world > 1 ? 0.0 : static_cast<double>(probe.bytes_read()), at::kDouble)};
  c10d::AllreduceOptions max;
  max.reduceOp = c10d::ReduceOp::MAX;
  group.allreduce(most, max)->wait();

  // Replicated reads: a tensor every rank loads whole (saved once), loaded
  // with each ReplicatedReads mode, hosts of 4 ranks (GROUP_RANK = rank / 4).
  // Measured: the bytes all ranks read from storage for one load, and the
  // time of a load.
  const dcp::DcpStateDict embedding{{"embedding", at::arange(kEmbeddingFloats, at::kFloat)}};
  {
    dcp::FileSystemWriter writer(dir / "replicated", {.sync_files = false});
    dcp::save_state_dict(embedding, writer, nullptr, pg);
  }
  ::setenv("GROUP_RANK", std::to_string(rank / 4).c_str(), 1);
  double shared_bytes[3] = {}, shared_time[3] = {1e9, 1e9, 1e9};
  const dcp::ReplicatedReads modes[3] = {dcp::ReplicatedReads::every_rank,
                                         dcp::ReplicatedReads::once_per_host, dcp::ReplicatedReads::once};
  // A load with each mode first (untimed: first touches), then rounds that
  // take the modes in turn; the best load of each mode counts.
  for (int round = -1; round < kSharedRounds; ++round)
    for (int m = 0; m < 3; ++m) {
      dcp::DcpStateDict target{{"embedding", at::zeros({kEmbeddingFloats}, at::kFloat)}};
      std::uint64_t bytes = 0;
      const double t = timed(group, [&] {
        dcp::FileSystemReader reader(dir / "replicated");
        dcp::load_state_dict(target, reader, nullptr, pg, 0, false, std::nullopt, modes[m]);
        bytes = reader.bytes_read();
      });
      if (!at::equal(std::get<at::Tensor>(target[0].second), std::get<at::Tensor>(embedding[0].second)))
        throw std::runtime_error("the shared load gave other values");
      if (round < 0) {
        std::vector<at::Tensor> sum{at::full({1}, static_cast<double>(bytes), at::kDouble)};
        group.allreduce(sum)->wait();
        shared_bytes[m] = sum[0].item<double>();
        continue;
      }
      shared_time[m] = std::min(shared_time[m], t);
    }
  if (rank == 0)
    std::printf("RESULT %zu %ju %.6f %.6f %.6f %.0f %.6f %.6f %.0f %.0f %.0f %.6f %.6f %.6f\n", plan_bytes,
                static_cast<std::uintmax_t>(metadata_bytes), save / kRounds, load / kRounds, bare / kRounds,
                most[0].item<double>(), load_every_rank / kRounds, save_cached / kRounds, shared_bytes[0],
                shared_bytes[1], shared_bytes[2], shared_time[0], shared_time[1], shared_time[2]);
  group.barrier()->wait();
  return 0;
}

/// The coordinator's share of a save of N ranks, in this process.
void coordinator_model() {
  fmt::print("\nthe coordinator's share of a save, N ranks made in this process\n\n");
  fmt::print("{:>6} {:>14} {:>14} {:>14} {:>12} {:>14} {:>16}\n", "ranks", "gathered B", "scattered B",
             "metadata B", "coord ms", "us per rank", "metadata B/rank");
  struct Saved {
    std::int64_t ranks;
    dcp::CheckpointMetadata metadata;
    std::size_t bytes;
  };
  std::vector<Saved> loads;
  for (std::int64_t n : {16, 128, 1000, 10000}) {
    std::vector<std::string> gathered;
    gathered.reserve(static_cast<std::size_t>(n));
    for (std::int64_t r = 0; r < n; ++r) {
      // A local plan as rank r makes it (its shards, the replicated keys, the value).
      dcp::SavePlan plan;
      for (int k = 0; k < kShardedKeys; ++k) {
        dcp::WriteItem w;
        w.index = {fmt::format("model.layers.{}.weight", k), std::vector<std::int64_t>{kRowsPerRank * r, 0},
                   std::nullopt};
        w.type = dcp::WriteItemType::shard;
        w.tensor_data = dcp::TensorWriteData{
            {{kRowsPerRank * r, 0}, {kRowsPerRank, kCols}}, {at::kFloat, false}, {kRowsPerRank * n, kCols}};
        plan.items.push_back(std::move(w));
      }
      for (int k = 0; k < kReplicatedKeys; ++k) {
        dcp::WriteItem w;
        w.index = {fmt::format("model.norm.{}.bias", k), std::vector<std::int64_t>{0}, std::nullopt};
        w.tensor_data = dcp::TensorWriteData{{{0}, {256}}, {at::kFloat, false}, {256}};
        plan.items.push_back(std::move(w));
      }
      dcp::WriteItem value;
      value.index = {"step", std::nullopt, std::nullopt};
      value.type = dcp::WriteItemType::bytes;
      plan.items.push_back(std::move(value));
      gathered.push_back(dcp::detail::encode(plan));
    }
    std::size_t gathered_bytes = 0;
    for (const auto& g : gathered) gathered_bytes += g.size();
    const auto start = Clock::now();
    std::vector<dcp::SavePlan> plans;
    plans.reserve(gathered.size());
    for (const auto& g : gathered) plans.push_back(dcp::detail::decode_save_plan(g));
    dcp::DefaultSavePlanner planner;
    auto [global, md] = planner.create_global_plan(std::move(plans));
    std::size_t scattered = 0;
    for (std::size_t r = 0; r < global.size(); ++r) {
      global[r].storage_data = fmt::format("__{}_0", r);
      scattered += dcp::detail::encode(global[r]).size();
    }
    dcp::CheckpointMetadata cm{md, {}};
    for (const auto& p : global)
      for (const auto& w : p.items)
        cm.storage_data[w.index] = {p.storage_data + ".distcp", 4096, 65536, 0, false, {}};
    const auto metadata = dcp::detail::encode_checkpoint_metadata(cm);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    fmt::print("{:>6} {:>14} {:>14} {:>14} {:>12.1f} {:>14.1f} {:>16.0f}\n", n, gathered_bytes, scattered,
               metadata.size(), ms, ms * 1e3 / static_cast<double>(n),
               static_cast<double>(metadata.size()) / static_cast<double>(n));
    loads.push_back({n, std::move(cm), metadata.size()});
  }

  // A load of the same checkpoint on the same N ranks: the coordinator alone
  // reads the metadata and cuts each rank its part (metadata_part), as
  // load_state_dict does with a FileSystemReader; a rank receives its part
  // where it used to read the whole file.
  fmt::print("\nthe metadata of a load, N ranks made in this process\n\n");
  fmt::print("{:>6} {:>14} {:>16} {:>16} {:>12} {:>14}\n", "ranks", "metadata B", "rank's part B",
             "part/metadata", "coord ms", "us per rank");
  for (const auto& [n, cm, metadata_bytes] : loads) {
    // What each rank asks for: its shard of every sharded key, the
    // replicated keys and the value whole (the default load planner's
    // request for model_state, encoded as a rank sends it).
    std::vector<std::string> asked;
    asked.reserve(static_cast<std::size_t>(n));
    for (std::int64_t r = 0; r < n; ++r) {
      dcp::MetadataRequest request;
      for (int k = 0; k < kShardedKeys; ++k)
        request.keys.push_back(
            {fmt::format("model.layers.{}.weight", k),
             std::vector<dcp::ChunkStorageMetadata>{{{kRowsPerRank * r, 0}, {kRowsPerRank, kCols}}}});
      for (int k = 0; k < kReplicatedKeys; ++k)
        request.keys.push_back({fmt::format("model.norm.{}.bias", k), {}});
      request.keys.push_back({"step", std::nullopt});
      asked.push_back(dcp::detail::encode(request));
    }
    // The coordinator's share, as load_state_dict runs it.
    const auto start = Clock::now();
    std::vector<dcp::MetadataRequest> requests;
    requests.reserve(asked.size());
    for (const auto& a : asked) requests.push_back(dcp::detail::decode_metadata_request(a));
    std::size_t largest = 0;
    for (const auto& part : dcp::metadata_parts(cm, requests))
      largest = std::max(largest, dcp::detail::encode_metadata_part(part).size());
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    fmt::print("{:>6} {:>14} {:>16} {:>16.5f} {:>12.1f} {:>14.1f}\n", n, metadata_bytes, largest,
               static_cast<double>(largest) / static_cast<double>(metadata_bytes), ms,
               ms * 1e3 / static_cast<double>(n));
  }
}

}  // namespace

constexpr int kThroughputTensors = 16;
constexpr std::int64_t kThroughputNumel = std::int64_t{16} << 20;  // 64 MiB of float32
constexpr int kThroughputRounds = 5;

/// Best save and best in-place load of Python's DCP ("save load" in
/// seconds), run by `python` (a command line); nothing when it did not run.
std::optional<std::pair<double, double>> python_dcp(const std::string& python, const fs::path& dir) {
  std::string out;
  try {
    out = capture(fmt::format("{} -B '{}/tests/perf/dcp_reference.py' '{}' {} {} {} 2>&1", python,
                              CKPT_SOURCE_DIR, dir.string(), kThroughputTensors, kThroughputNumel,
                              kThroughputRounds));
  } catch (const std::exception& e) {
    out = e.what();
  }
  double save = 0, load = 0;
  if (std::sscanf(out.c_str(), "%lf %lf", &save, &load) != 2) {
    fmt::print("  ({} did not run: {})\n", python, out.substr(0, 200));
    return std::nullopt;
  }
  return std::make_pair(save, load);
}

double seconds(const std::function<void()>& fn) {
  const auto start = Clock::now();
  fn();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void throughput(const fs::path& root) {
  const double gib = double(kThroughputTensors) * double(kThroughputNumel) * 4 / double(1 << 30);
  fmt::print("\nsave and in-place load of {:.2f} GiB of float32 ({} tensors) on one process, best of {}\n\n",
             gib, kThroughputTensors, kThroughputRounds);
  ckpt::StateDict sd;
  ckpt::StateDict target;
  for (int i = 0; i < kThroughputTensors; ++i) {
    sd.insert(fmt::format("layers.{}.weight", i), at::full({kThroughputNumel}, float(i)));
    target.insert(fmt::format("layers.{}.weight", i), at::empty({kThroughputNumel}));
  }
  const fs::path dir = root / "throughput";
  double save = 1e30, load = 1e30;
  for (int round = 0; round < kThroughputRounds; ++round) {
    fs::remove_all(dir);
    dcp::SaveOptions so;
    so.checkpoint_id = dir;
    so.no_dist = true;
    save = std::min(save, seconds([&] { dcp::save(sd, so); }));
    dcp::LoadOptions lo;
    lo.checkpoint_id = dir;
    lo.no_dist = true;
    load = std::min(load, seconds([&] { dcp::load(target, lo); }));
  }
  for (int i = 0; i < kThroughputTensors; ++i)
    if (!target.at(fmt::format("layers.{}.weight", i))
             .toTensor()
             .equal(sd.at(fmt::format("layers.{}.weight", i)).toTensor()))
      throw std::runtime_error("the loaded values are not the saved ones");
  fs::remove_all(dir);
  const auto torch26 = python_dcp(fmt::format("CKPT_CHROOT_BIND='{}:{}' '{}/cmake/chroot-python'",
                                              root.string(), CKPT_SOURCE_DIR, CKPT_SOURCE_DIR),
                                  root / "python26");
  const auto torch113 = python_dcp("/usr/bin/python3", root / "python113");
  fmt::print("{:<16} {:>8} {:>8} {:>10} {:>10} {:>22} {:>22}\n", "writer", "save s", "load s", "save GB/s",
             "load GB/s", "save speed vs torch 2.6", "load speed vs torch 2.6");
  const double bytes = gib * double(1 << 30);
  const auto row = [&](const std::string& who, double s, double l) {
    if (torch26)
      fmt::print("{:<16} {:>8.2f} {:>8.2f} {:>10.2f} {:>10.2f} {:>21.2f}x {:>21.2f}x\n", who, s, l,
                 bytes / s / 1e9, bytes / l / 1e9, torch26->first / s, torch26->second / l);
    else
      fmt::print("{:<16} {:>8.2f} {:>8.2f} {:>10.2f} {:>10.2f}\n", who, s, l, bytes / s / 1e9,
                 bytes / l / 1e9);
  };
  row("ckpt", save, load);
  if (torch26) row("python torch 2.6", torch26->first, torch26->second);
  if (torch113) row("python torch 1.13", torch113->first, torch113->second);
}

/// A "training step": matrix products on one thread.
void train_step() {
  static const auto b = at::ones({256, 256});
  static auto a = at::ones({256, 256});
  a = at::mm(a, b).div_(256.0f);
}

/// Training steps per second while `going()`.
double steps_per_second(const std::function<bool()>& going) {
  int steps = 0;
  const double t = seconds([&] {
    while (going()) {
      train_step();
      ++steps;
    }
  });
  return steps / t;
}

void async_table(const fs::path& root) {
  constexpr int kTensors = 64;
  constexpr std::int64_t kNumel = std::int64_t{4} << 20;  // 16 MiB of float32
  constexpr int kRounds = 3;
  at::set_num_threads(1);
  const double bytes = double(kTensors) * double(kNumel) * 4;
  ckpt::StateDict sd;
  std::vector<at::Tensor> tensors;
  for (int i = 0; i < kTensors; ++i) {
    tensors.push_back(at::full({kNumel}, float(i)));
    sd.insert(fmt::format("layers.{}.weight", i), tensors.back());
  }
  // The references: a warm memcpy of the same bytes, and the synchronous save.
  std::vector<char> buffer(static_cast<std::size_t>(bytes));
  std::memset(buffer.data(), 1, buffer.size());
  double t_memcpy = 1e30, t_sync = 1e30;
  for (int r = 0; r < kRounds; ++r) {
    t_memcpy = std::min(t_memcpy, seconds([&] {
                          std::size_t at = 0;
                          for (const auto& t : tensors) {
                            std::memcpy(buffer.data() + at, t.data_ptr(), t.nbytes());
                            at += t.nbytes();
                          }
                        }));
  }
  std::vector<char>().swap(buffer);
  const auto options = [&](const std::string& name) {
    dcp::SaveOptions o;
    o.checkpoint_id = root / name;
    o.no_dist = true;
    return o;
  };
  for (int r = 0; r < kRounds; ++r)
    t_sync = std::min(t_sync, seconds([&] { dcp::save(sd, options("sync")); }));

  boost::asio::thread_pool completions(1);
  dcp::AsyncSaver saver(completions.get_executor());
  double blocked = 1e30, committed = 1e30;
  for (int r = 0; r <= kRounds; ++r) {  // round 0 grows the arena: not counted
    std::future<void> written;
    const auto start = Clock::now();
    const double b = seconds([&] {
      auto f = saver.save(sd, options("async"));
      f.staged.get();
      written = std::move(f.written);
    });
    written.get();
    const double c = std::chrono::duration<double>(Clock::now() - start).count();
    if (r == 0) continue;
    blocked = std::min(blocked, b);
    committed = std::min(committed, c);
  }
  double rate_alone = 0, rate_during = 0;
  for (int r = 0; r < kRounds; ++r) {
    const auto until = Clock::now() + std::chrono::duration<double>(committed);
    rate_alone = std::max(rate_alone, steps_per_second([&] { return Clock::now() < until; }));
    auto f = saver.save(sd, options("async"));
    f.staged.get();
    rate_during = std::max(rate_during, steps_per_second([&] {
                             return f.written.wait_for(std::chrono::seconds(0)) != std::future_status::ready;
                           }));
    f.written.get();
  }
  const std::uint64_t arena = saver.arena_size();
  const bool pinned = saver.pinned();
  saver.close();
  {
    // What was committed is what was saved.
    const auto loaded = dcp::load_all(root / "async", [] {
      dcp::LoadOptions o;
      o.no_dist = true;
      return o;
    }());
    for (int i = 0; i < kTensors; ++i)
      if (!loaded.at(fmt::format("layers.{}.weight", i))
               .toTensor()
               .equal(tensors[static_cast<std::size_t>(i)]))
        throw std::runtime_error("the committed checkpoint is not the saved state");
  }
  fs::remove_all(root / "sync");
  fs::remove_all(root / "async");
  std::optional<std::pair<double, double>> python;
  {
    std::string out;
    try {
      out =
          capture(fmt::format("CKPT_CHROOT_BIND='{}:{}' '{}/cmake/chroot-python' -B "
                              "'{}/tests/perf/dcp_async_reference.py' '{}' {} {} {} 2>&1",
                              root.string(), CKPT_SOURCE_DIR, CKPT_SOURCE_DIR, CKPT_SOURCE_DIR,
                              (root / "python").string(), kTensors, kNumel, kRounds));
    } catch (const std::exception& e) {
      out = e.what();
    }
    double b = 0, d = 0;
    if (std::sscanf(out.c_str(), "%lf %lf", &b, &d) == 2)
      python = std::make_pair(b, d);
    else
      fmt::print("  (torch 2.6 did not run: {})\n", out.substr(0, 200));
  }

  fmt::print(
      "\ndcp::AsyncSaver, one process, {:.2f} GiB of float32 ({} tensors), best of {}; arena {} MiB{}\n\n",
      bytes / double(1 << 30), kTensors, kRounds, arena >> 20, pinned ? ", page-locked" : "");
  fmt::print("{:<50} {:>9} {:>8}\n", "operation", "seconds", "GB/s");
  const auto row = [&](const std::string& what, double t) {
    fmt::print("{:<50} {:>9.4f} {:>8.2f}\n", what, t, bytes / t / 1e9);
  };
  row("reference: warm memcpy of the rank's bytes", t_memcpy);
  row("reference: synchronous dcp::save", t_sync);
  row("async_save: blocked until staged", blocked);
  row("async_save: until committed", committed);
  if (python) {
    row("torch 2.6 dcp.async_save: blocked", python->first);
    row("torch 2.6 dcp.async_save: until done", python->second);
  }
  fmt::print("{:<50} {:>9.1f} steps/s\n", "training alone", rate_alone);
  fmt::print("{:<50} {:>9.1f} steps/s\n", "training while the write runs", rate_during);
  fmt::print("\n{:<50} {:>9} {:>8}\n", "ratio", "value", "target");
  const auto ratio = [](const std::string& what, double v, const std::string& target, bool met) {
    fmt::print("{:<50} {:>9.3f} {:>8} {}\n", what, v, target, met ? "met" : (target.empty() ? "" : "MISSED"));
  };
  ratio("blocking time / warm memcpy", blocked / t_memcpy, "<= 1.5", blocked / t_memcpy <= 1.5);
  ratio("synchronous save / blocking time", t_sync / blocked, "", false);
  const double slowdown = rate_alone / rate_during - 1.0;
  ratio("training slowdown while the write runs", slowdown, "< 0.10", slowdown < 0.10);
  if (python) {
    ratio("torch 2.6 blocking time / ckpt blocking time", python->first / blocked, "", false);
    fmt::print(
        "(torch 2.6 copies no CPU tensor before it returns: its thread writes the live tensors,\n"
        " so a step taken meanwhile changes what it saves; ckpt's blocking time is the copy)\n");
  }
}

/// Empties the page cache (root only); false when it could not.
bool drop_page_cache() {
  ::sync();
  std::ofstream out("/proc/sys/vm/drop_caches");
  out << "1\n";
  out.flush();
  return static_cast<bool>(out);
}

/// Reads every byte of `files` with O_DIRECT, 4 MiB at a time, `depth` reads
/// in flight (one thread each); returns the bytes read.
std::uint64_t direct_read(const std::vector<fs::path>& files, int depth) {
  constexpr std::size_t kChunk = std::size_t{4} << 20;
  std::atomic<std::uint64_t> total{0};
  for (const auto& file : files) {
    const int fd = ::open(file.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error("cannot open " + file.string() + " with O_DIRECT");
    const auto size = fs::file_size(file);
    std::atomic<std::uint64_t> next{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < depth; ++t)
      threads.emplace_back([&] {
        void* raw = nullptr;
        if (::posix_memalign(&raw, 4096, kChunk) != 0) return;
        for (;;) {
          const std::uint64_t at = next.fetch_add(kChunk);
          if (at >= size) break;
          const ssize_t n = ::pread(fd, raw, kChunk, static_cast<off_t>(at));
          if (n <= 0) break;
          total += static_cast<std::uint64_t>(n);
        }
        std::free(raw);
      });
    for (auto& t : threads) t.join();
    ::close(fd);
  }
  return total;
}

void load_table(const fs::path& root) {
  constexpr std::int64_t kRowsTotal = 8192, kColsTotal = 32768;
  constexpr int kRounds = 3;
  const double bytes = double(kRowsTotal) * double(kColsTotal) * 4;
  const auto four = [](std::int64_t dim) {
    dcp::ChunkShardingSpec spec;
    spec.dim = dim;
    for (int i = 0; i < 4; ++i) spec.placements.push_back("rank:0/cpu");
    return spec;
  };
  const fs::path dir = root / "load";
  {
    auto saved = dcp::ShardedTensor::zeros(four(0), {kRowsTotal, kColsTotal}, 0, at::kFloat);
    for (auto& shard : saved.local_shards())
      shard.tensor.copy_(at::arange(shard.tensor.numel(), at::kFloat).reshape(shard.tensor.sizes()));
    ckpt::StateDict sd;
    sd.insert("table", dcp::sharded_value(saved));
    dcp::SaveOptions o;
    o.checkpoint_id = dir;
    o.no_dist = true;
    dcp::save(sd, o);
  }
  dcp::LoadOptions lo;
  lo.checkpoint_id = dir;
  lo.no_dist = true;
  auto rows = dcp::ShardedTensor::zeros(four(0), {kRowsTotal, kColsTotal}, 0, at::kFloat);
  auto cols = dcp::ShardedTensor::zeros(four(1), {kRowsTotal, kColsTotal}, 0, at::kFloat);
  const auto load_into = [&](const dcp::ShardedTensor& target) {
    ckpt::StateDict sd;
    sd.insert("table", dcp::sharded_value(target));
    return seconds([&] { dcp::load(sd, lo); });
  };
  double t_rows = 1e30, t_cols = 1e30;
  for (int r = 0; r < kRounds; ++r) {
    t_rows = std::min(t_rows, load_into(rows));
    t_cols = std::min(t_cols, load_into(cols));
  }
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".distcp") files.push_back(e.path());
  std::optional<double> t_cold, t_direct;
  std::uint64_t direct_bytes = 0;
  // Cold: the best of three rounds each, taken in turns (a virtual disk's
  // speed wanders from one second to the next).
  for (int r = 0; r < kRounds && drop_page_cache(); ++r) {
    t_cold = std::min(t_cold.value_or(1e30), load_into(rows));
    drop_page_cache();
    t_direct = std::min(t_direct.value_or(1e30), seconds([&] { direct_bytes = direct_read(files, 4); }));
  }
  fs::remove_all(dir);

  // Narrow rows: 256 MiB of float32 rows of 256 bytes, loaded into 4 column
  // shards (runs of 64 bytes, 192 apart) with the default reader (gaps joined
  // into vectored reads) and with one read per run (coalesce_gap 0).
  constexpr std::int64_t kNarrowRows = 1 << 20, kNarrowCols = 64;
  const double narrow_bytes = double(kNarrowRows) * double(kNarrowCols) * 4;
  {
    ckpt::StateDict sd;
    sd.insert("narrow", dcp::sharded_value(
                            dcp::ShardedTensor::zeros(four(0), {kNarrowRows, kNarrowCols}, 0, at::kFloat)));
    dcp::SaveOptions o;
    o.checkpoint_id = dir;
    o.no_dist = true;
    dcp::save(sd, o);
  }
  auto narrow_cols = dcp::ShardedTensor::zeros(four(1), {kNarrowRows, kNarrowCols}, 0, at::kFloat);
  auto narrow_rows = dcp::ShardedTensor::zeros(four(0), {kNarrowRows, kNarrowCols}, 0, at::kFloat);
  const auto load_narrow = [&](const dcp::ShardedTensor& target, dcp::FileSystemReaderOptions options,
                               std::uint64_t& reads) {
    ckpt::StateDict sd;
    sd.insert("narrow", dcp::sharded_value(target));
    dcp::FileSystemReader reader(dir, options);
    dcp::LoadOptions o = lo;
    o.storage_reader = &reader;
    const double t = seconds([&] { dcp::load(sd, o); });
    reads = reader.data_reads();
    return t;
  };
  double t_narrow_rows = 1e30, t_narrow_checked = 1e30, t_narrow_joined = 1e30, t_narrow_each = 1e30;
  std::uint64_t reads_rows = 0, reads_checked = 0, reads_joined = 0, reads_each = 0;
  for (int r = 0; r < kRounds; ++r) {
    t_narrow_rows = std::min(t_narrow_rows, load_narrow(narrow_rows, {}, reads_rows));
    t_narrow_checked = std::min(t_narrow_checked, load_narrow(narrow_cols, {}, reads_checked));
    t_narrow_joined =
        std::min(t_narrow_joined, load_narrow(narrow_cols, {.verify_blocks = false}, reads_joined));
    t_narrow_each = std::min(
        t_narrow_each, load_narrow(narrow_cols, {.coalesce_gap = 0, .verify_blocks = false}, reads_each));
  }
  fs::remove_all(dir);

  fmt::print("\nloads of {:.2f} GiB of float32 ({} x {}) saved in 4 row shards, one process\n\n",
             bytes / double(1 << 30), kRowsTotal, kColsTotal);
  fmt::print("{:<52} {:>9} {:>8}\n", "operation", "seconds", "GB/s");
  const auto row = [&](const std::string& what, double t, double b) {
    fmt::print("{:<52} {:>9.4f} {:>8.2f}\n", what, t, b / t / 1e9);
  };
  row("warm load into 4 row shards", t_rows, bytes);
  row("warm load into 4 column shards", t_cols, bytes);
  if (t_cold) {
    row("cold load into 4 row shards", *t_cold, bytes);
    row("reference: cold O_DIRECT read, 4 MiB x 4 in flight", *t_direct, double(direct_bytes));
  } else {
    fmt::print("(no cold loads: the page cache cannot be dropped without root)\n");
  }
  fmt::print("\nloads of {:.2f} GiB of float32 ({} x {}, rows of {} bytes), page cache warm\n\n",
             narrow_bytes / double(1 << 30), kNarrowRows, kNarrowCols, kNarrowCols * 4);
  fmt::print("{:<52} {:>9} {:>8} {:>10}\n", "operation", "seconds", "GB/s", "reads");
  const auto narrow_row = [&](const std::string& what, double t, std::uint64_t reads) {
    fmt::print("{:<52} {:>9.4f} {:>8.2f} {:>10}\n", what, t, narrow_bytes / t / 1e9, reads);
  };
  narrow_row("into 4 row shards", t_narrow_rows, reads_rows);
  narrow_row("into 4 column shards (default: blocks checked)", t_narrow_checked, reads_checked);
  narrow_row("into 4 column shards, unchecked, ranges joined", t_narrow_joined, reads_joined);
  narrow_row("into 4 column shards, unchecked, a read per range", t_narrow_each, reads_each);

  fmt::print("\n{:<52} {:>9} {:>8}\n", "ratio", "value", "target");
  const double columns = t_rows / t_cols;
  fmt::print("{:<52} {:>9.3f} {:>8} {}\n", "column-sharded load speed / row-sharded", columns, ">= 0.5",
             columns >= 0.5 ? "met" : "MISSED");
  fmt::print("{:<52} {:>9.3f}\n", "narrow rows: column load speed / row-sharded",
             t_narrow_rows / t_narrow_checked);
  fmt::print("{:<52} {:>9.3f}\n", "narrow rows: checked / unchecked column load (speed)",
             t_narrow_joined / t_narrow_checked);
  fmt::print("{:<52} {:>9.3f}\n", "narrow rows: joined / a read per range (speed)",
             t_narrow_each / t_narrow_joined);
  if (t_cold) {
    const double cold = (bytes / *t_cold) / (double(direct_bytes) / *t_direct);
    fmt::print("{:<52} {:>9.3f} {:>8} {}\n", "cold load throughput / O_DIRECT reference", cold, ">= 0.8",
               cold >= 0.8 ? "met" : "MISSED");
  }
}

int main(int argc, char** argv) try {
  if (std::getenv("RANK") && argc >= 2) return rank_main(argv[1]);

  const char* tmp = std::getenv("TMPDIR");
  const fs::path root = fs::path(argc > 1 ? argv[1] : (tmp && *tmp ? tmp : "/tmp")) / "ckpt-bench-dcp";
  const fs::path self = fs::canonical("/proc/self/exe");
  const fs::path launcher = self.parent_path() / "ckpt-launch";
  const bool scaling_only = argc > 2 && std::string(argv[2]) == "scaling";
  if (argc > 2 && std::string(argv[2]) == "load") {
    fs::create_directories(root);
    load_table(root);
    fs::remove_all(root);
    return 0;
  }
  if (argc > 2 && std::string(argv[2]) == "async") {
    fs::create_directories(root);
    async_table(root);
    fs::remove_all(root);
    return 0;
  }
  if (argc > 2 && std::string(argv[2]) == "throughput") {
    fs::create_directories(root);
    throughput(root);
    fs::remove_all(root);
    return 0;
  }

  fmt::print(
      "save_state_dict / load_state_dict of {} sharded keys ({} KiB per rank each), {} replicated keys\n"
      "and a value; 10 rounds; reference: a bare Gloo barrier in the same run\n\n",
      kShardedKeys, kRowsPerRank * kCols * 4 / 1024, kReplicatedKeys);
  fmt::print("{:>5} {:>12} {:>12} {:>10} {:>10} {:>11} {:>14} {:>14} {:>14} {:>18} {:>13}\n", "ranks",
             "local plan B", "metadata B", "save ms", "load ms", "barrier ms", "save/barrier", "load/barrier",
             "rank load B", "load/every-rank", "save cached");
  std::vector<std::pair<int, std::vector<double>>> shared_rows;
  for (int n : {1, 2, 4, 8, 16}) {
    fs::remove_all(root);
    fs::create_directories(root);
    const auto r = result_of(capture(fmt::format("'{}' -n {} --timeout 600 '{}' '{}' 2>&1", launcher.string(),
                                                 n, self.string(), root.string())));
    fmt::print(
        "{:>5} {:>12.0f} {:>12.0f} {:>10.2f} {:>10.2f} {:>11.3f} {:>14.1f} {:>14.1f} {:>14.0f} {:>17.2f}x "
        "{:>12.2f}x\n",
        n, r[0], r[1], r[2] * 1e3, r[3] * 1e3, r[4] * 1e3, r[2] / r[4], r[3] / r[4], r[5], r[6] / r[3],
        r[2] / r[7]);
    shared_rows.emplace_back(n, r);
  }
  fmt::print(
      "\nreplicated reads: a {} MiB tensor every rank loads whole, hosts of 4 ranks (GROUP_RANK); storage\n"
      "MiB read by all ranks for one load, and load time against every rank reading it (higher is "
      "faster)\n\n",
      kEmbeddingFloats * 4 >> 20);
  fmt::print("{:>5} {:>14} {:>14} {:>10} {:>16} {:>10}\n", "ranks", "every rank MiB", "per host MiB",
             "once MiB", "per host speed", "once speed");
  for (const auto& [n, r] : shared_rows)
    fmt::print("{:>5} {:>14.1f} {:>14.1f} {:>10.1f} {:>15.2f}x {:>9.2f}x\n", n, r[8] / (1 << 20),
               r[9] / (1 << 20), r[10] / (1 << 20), r[11] / r[12], r[11] / r[13]);
  fs::remove_all(root);
  coordinator_model();
  if (scaling_only) return 0;
  fs::create_directories(root);
  throughput(root);
  fs::remove_all(root);
  fs::create_directories(root);
  async_table(root);
  fs::remove_all(root);
  fs::create_directories(root);
  load_table(root);
  fs::remove_all(root);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_dcp: %s\n", e.what());
  return 1;
}
