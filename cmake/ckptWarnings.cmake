# ckpt_warnings(target): the project's own code builds clean with these on.
function(ckpt_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang>:-Wall -Wextra -Wpedantic -Wno-unused-parameter>)
endfunction()
