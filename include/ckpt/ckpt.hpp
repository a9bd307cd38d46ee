// Everything ckpt offers, in one include.
#pragma once

#include <ckpt/async_checkpointer.hpp>
#include <ckpt/barrier.hpp>
#include <ckpt/checkpoint_manager.hpp>
#include <ckpt/checkpoint_process.hpp>
#include <ckpt/checkpoint_reader.hpp>
#include <ckpt/checkpoint_writer.hpp>
#include <ckpt/checkpointer.hpp>
#include <ckpt/commit.hpp>
#include <ckpt/dcp/async_saver.hpp>
#include <ckpt/dcp/convert.hpp>
#include <ckpt/dcp/hf_storage.hpp>
#include <ckpt/dcp/metadata.hpp>
#include <ckpt/dcp/planner.hpp>
#include <ckpt/dcp/state_dict_saver.hpp>
#include <ckpt/dcp/storage.hpp>
#include <ckpt/dist.hpp>
#include <ckpt/error.hpp>
#include <ckpt/format.hpp>
#include <ckpt/safetensors.hpp>
#include <ckpt/staging.hpp>
#include <ckpt/state_dict.hpp>
#include <ckpt/tcp_store_barrier.hpp>
#include <ckpt/types.hpp>
#include <ckpt/writer_main.hpp>
