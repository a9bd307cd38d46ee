# The dependencies, all from Debian packages (cmake/install-deps.sh).
# Torch's CMake target carries USE_DISTRIBUTED / USE_C10D_GLOO, without which the
# c10d headers declare nothing. Boost must be 1.81 (Process v2, Asio channels),
# not the distribution's default 1.74, so it is found by its CMake config.
include(CMakeFindDependencyMacro)
find_package(Torch REQUIRED)
find_package(Boost 1.81 REQUIRED CONFIG COMPONENTS json unit_test_framework)
find_package(fmt REQUIRED)
# CRC-32 (zlib's polynomial) from libdeflate, about three times zlib's speed.
find_package(PkgConfig REQUIRED)
pkg_check_modules(LIBDEFLATE REQUIRED IMPORTED_TARGET libdeflate)
# zstd: DCP items through upstream's "stream.zstd/1" transform.
pkg_check_modules(LIBZSTD REQUIRED IMPORTED_TARGET libzstd)
# zlib: crc32_combine (the CRC-32 of a chunk read in pieces) and the
# multi_rank sample (its checksums of a state).
find_package(ZLIB 1.2.12 REQUIRED)  # crc32_combine_gen64 and crc32_combine_op
find_package(Threads REQUIRED)
