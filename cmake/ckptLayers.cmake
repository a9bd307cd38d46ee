# ckpt_layer(NAME SOURCES... [DEPENDS layer...] [PUBLIC_LINK lib...] [PRIVATE_LINK lib...])
#
# One layer of lib/ as an internal object library `ckpt_<NAME>`. DEPENDS names
# the lower layers it may use: its link dependencies state the allowed
# direction (cmake/check_layers.py enforces it on every include). The installed
# library ckpt::ckpt is made of every layer's objects.
function(ckpt_layer name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPENDS;PUBLIC_LINK;PRIVATE_LINK" ${ARGN})
  set(target ckpt_${name})
  add_library(${target} OBJECT ${ARG_SOURCES})
  target_include_directories(${target} PUBLIC
    "$<BUILD_INTERFACE:${CKPT_ROOT}/include>" "$<BUILD_INTERFACE:${CKPT_ROOT}/lib>")
  target_compile_features(${target} PUBLIC cxx_std_20)
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  foreach(dep IN LISTS ARG_DEPENDS)
    target_link_libraries(${target} PUBLIC ckpt_${dep})
  endforeach()
  target_link_libraries(${target} PUBLIC ${ARG_PUBLIC_LINK} PRIVATE ${ARG_PRIVATE_LINK})
  if(COMMAND ckpt_warnings)
    ckpt_warnings(${target})
  endif()
  if(TARGET ckpt_layering)
    add_dependencies(${target} ckpt_layering)
  endif()
  set_property(GLOBAL APPEND PROPERTY CKPT_LAYERS ${target})
endfunction()
