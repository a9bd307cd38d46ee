# The dependencies, all from Debian packages (cmake/install-deps.sh).
# Torch's CMake target carries USE_DISTRIBUTED / USE_C10D_GLOO, without which the
# c10d headers declare nothing. Boost must be 1.81 (Process v2, Asio channels),
# not the distribution's default 1.74, so it is found by its CMake config.
include(CMakeFindDependencyMacro)
find_package(Torch REQUIRED)
find_package(Boost 1.81 REQUIRED CONFIG COMPONENTS json unit_test_framework)
find_package(fmt REQUIRED)
find_package(ZLIB REQUIRED)
find_package(Threads REQUIRED)
