# Use ccache when present: the libtorch headers make every translation unit slow.
find_program(CKPT_CCACHE ccache)
if(CKPT_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  set(CMAKE_C_COMPILER_LAUNCHER "${CKPT_CCACHE}")
  set(CMAKE_CXX_COMPILER_LAUNCHER "${CKPT_CCACHE}")
endif()
