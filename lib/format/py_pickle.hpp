// A restricted reader of Python pickles that describe objects rather than
// state dicts (DCP's `.metadata`). It builds a tree of what the pickle says —
// values, the classes it names, the calls and instantiations it asks for, the
// states it sets — and runs none of it. Which globals may appear is the
// caller's allowlist; the caller then interprets the tree.
#pragma once

#include <cstdint>
#include <deque>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ckpt::detail {

struct PyNode {
  enum class Kind {
    none,
    boolean,
    integer,
    real,
    string,
    bytes,
    tuple,
    list,
    dict,
    global,  ///< a class or function named by the pickle: `s` is "module.qualname"
    call,    ///< REDUCE: `callee` called with the tuple `items`
    object,  ///< NEWOBJ: an instance of `callee` made with the arguments `items`
  };
  Kind kind = Kind::none;
  bool b = false;
  std::int64_t i = 0;
  double d = 0;
  std::string s;                                                 ///< string, bytes, global
  std::vector<const PyNode*> items;                              ///< tuple, list; call/object arguments
  std::vector<std::pair<const PyNode*, const PyNode*>> entries;  ///< dict, in order
  const PyNode* callee = nullptr;                                ///< call, object: a global
  const PyNode* state = nullptr;                                 ///< call, object: what BUILD set

  /// The dict entry whose key is the string `key`, or nullptr.
  const PyNode* find(std::string_view key) const;
  /// Whether this is a call or object of the global `name` ("module.qualname").
  bool is(Kind k, std::string_view name) const;
};

/// Human-readable name of a kind ("dict", "global", ...).
const char* py_kind_name(PyNode::Kind kind);

struct PyPickle {
  std::deque<PyNode> nodes;  ///< owns every node; addresses are stable
  const PyNode* root = nullptr;
};

/// Decides whether a pickle may name `module`.`name`.
using GlobalAllowed = std::function<bool(std::string_view module, std::string_view name)>;

/// Parses `data`. A global the allowlist refuses, an unknown opcode, a
/// truncated or malformed stream, a reference cycle, nesting deeper than
/// kMaxNesting or an integer beyond 64 bits is a CorruptCheckpoint naming
/// `what` (e.g. "<dir>/.metadata") and the fault.
PyPickle parse_py_pickle(std::string_view data, const std::string& what, const GlobalAllowed& allowed);

}  // namespace ckpt::detail
