// Everything ckpt offers, in one include.
#pragma once

#include <ckpt/error.hpp>
#include <ckpt/format.hpp>
