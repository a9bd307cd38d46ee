#include "format/py_pickle.hpp"

#include "format/pickle_stream.hpp"
#include "format/tree_check.hpp"
#include "format/zip.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <unordered_map>

namespace ckpt::detail {

const PyNode* PyNode::find(std::string_view key) const {
  for (const auto& [k, v] : entries)
    if (k->kind == Kind::string && k->s == key) return v;
  return nullptr;
}

bool PyNode::is(Kind k, std::string_view name) const {
  return kind == k && callee && callee->s == name;
}

const char* py_kind_name(PyNode::Kind kind) {
  switch (kind) {
    case PyNode::Kind::none: return "None";
    case PyNode::Kind::boolean: return "bool";
    case PyNode::Kind::integer: return "int";
    case PyNode::Kind::real: return "float";
    case PyNode::Kind::string: return "str";
    case PyNode::Kind::bytes: return "bytes";
    case PyNode::Kind::tuple: return "tuple";
    case PyNode::Kind::list: return "list";
    case PyNode::Kind::dict: return "dict";
    case PyNode::Kind::global: return "global";
    case PyNode::Kind::call: return "call";
    case PyNode::Kind::object: return "object";
  }
  return "?";
}

namespace {

using Kind = PyNode::Kind;

class PyUnpickler {
 public:
  PyUnpickler(std::string_view data, const std::string& what, const GlobalAllowed& allowed)
      : in_(data, fmt::format("{}: bad pickle", what)), allowed_(allowed) {}

  PyPickle run() {
    for (;;) {
      const std::size_t at = in_.pos();
      const auto op = in_.byte();
      if (op == '.') break;
      dispatch(op, at);
    }
    if (!marks_.empty()) fail("pickle ends with an open MARK");
    if (stack_.size() != 1)
      fail(fmt::format("pickle ends with {} values on its stack, not 1", stack_.size()));
    out_.root = stack_.back();
    check_structure();
    return std::move(out_);
  }

 private:
  [[noreturn]] void fail(std::string_view what) const { in_.fail(what); }

  PyNode* make(Kind k) {
    PyNode& n = out_.nodes.emplace_back();
    n.kind = k;
    return &n;
  }
  void push(PyNode* n) { stack_.push_back(n); }
  std::size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  PyNode* pop() {
    if (stack_.size() <= floor()) fail("pops from an empty stack");
    PyNode* n = stack_.back();
    stack_.pop_back();
    return n;
  }
  PyNode* top() {
    if (stack_.size() <= floor()) fail("reads an empty stack");
    return stack_.back();
  }
  std::vector<PyNode*> pop_mark() {
    if (marks_.empty()) fail("an opcode needs a MARK that is not there");
    const std::size_t m = marks_.back();
    marks_.pop_back();
    std::vector<PyNode*> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  PyNode* container(Kind k, std::string_view op) {
    PyNode* n = top();
    if (n->kind != k) fail(fmt::format("{} on a {}, not a {}", op, py_kind_name(n->kind), py_kind_name(k)));
    return n;
  }
  void tuple(const std::vector<PyNode*>& items) {
    PyNode* t = make(Kind::tuple);
    t->items.assign(items.begin(), items.end());
    push(t);
  }
  void set_items(PyNode* d, const std::vector<PyNode*>& kv) {
    if (kv.size() % 2 != 0) fail("SETITEMS with an odd number of items");
    for (std::size_t i = 0; i < kv.size(); i += 2) d->entries.emplace_back(kv[i], kv[i + 1]);
  }
  void push_int(std::int64_t v) {
    PyNode* n = make(Kind::integer);
    n->i = v;
    push(n);
  }
  void push_text(Kind k, std::string_view s) {
    PyNode* n = make(k);
    n->s.assign(s);
    push(n);
  }
  void global(std::string_view module, std::string_view name) {
    if (!allowed_(module, name))
      fail(fmt::format("refusing global '{}.{}': not a class this file may name (loading never runs code)",
                       module, name));
    auto key = fmt::format("{}.{}", module, name);
    auto [it, fresh] = globals_.try_emplace(key, nullptr);
    if (fresh) {
      it->second = make(Kind::global);
      it->second->s = std::move(key);
    }
    push(it->second);
  }
  /// REDUCE and NEWOBJ: `callee` must be a global, `args` a tuple.
  void apply(Kind k, std::string_view op) {
    PyNode* args = pop();
    PyNode* callee = pop();
    if (callee->kind != Kind::global)
      fail(fmt::format("{} of a {}, not of an allowed global", op, py_kind_name(callee->kind)));
    if (args->kind != Kind::tuple)
      fail(fmt::format("{} arguments are a {}, not a tuple", op, py_kind_name(args->kind)));
    PyNode* n = make(k);
    n->callee = callee;
    n->items = args->items;
    push(n);
  }
  void memo_put(std::uint64_t idx) { memo_[idx] = top(); }
  void memo_get(std::uint64_t idx) {
    auto it = memo_.find(idx);
    if (it == memo_.end()) fail(fmt::format("memo reference {} was never stored (dangling)", idx));
    push(it->second);
  }

  void dispatch(unsigned char op, std::size_t at) {
    switch (op) {
      case 0x80: {  // PROTO
        const auto v = in_.byte();
        if (v > 5) fail(fmt::format("pickle protocol {} is unknown", v));
        break;
      }
      case 0x95: in_.take(8); break;  // FRAME: a hint only
      case '(': marks_.push_back(stack_.size()); break;
      case '}': push(make(Kind::dict)); break;
      case ']': push(make(Kind::list)); break;
      case ')': tuple({}); break;
      case 't': tuple(pop_mark()); break;
      case 0x85:
      case 0x86:
      case 0x87: {
        const std::size_t n = op - 0x84u;
        std::vector<PyNode*> items(n);
        for (std::size_t i = n; i-- > 0;) items[i] = pop();
        tuple(items);
        break;
      }
      case 'l': {
        PyNode* l = make(Kind::list);
        for (PyNode* e : pop_mark()) l->items.push_back(e);
        push(l);
        break;
      }
      case 'd': {
        auto kv = pop_mark();
        PyNode* d = make(Kind::dict);
        set_items(d, kv);
        push(d);
        break;
      }
      case 'a': {
        PyNode* v = pop();
        container(Kind::list, "APPEND")->items.push_back(v);
        break;
      }
      case 'e': {
        auto items = pop_mark();
        PyNode* l = container(Kind::list, "APPENDS");
        l->items.insert(l->items.end(), items.begin(), items.end());
        break;
      }
      case 's': {
        PyNode* v = pop();
        PyNode* k = pop();
        set_items(container(Kind::dict, "SETITEM"), {k, v});
        break;
      }
      case 'u': {
        auto kv = pop_mark();
        set_items(container(Kind::dict, "SETITEMS"), kv);
        break;
      }
      case 'J': push_int(static_cast<std::int32_t>(get32(in_.take(4)))); break;
      case 'K': push_int(*in_.take(1)); break;
      case 'M': push_int(get16(in_.take(2))); break;
      case 0x8a: push_int(in_.long_int(*in_.take(1))); break;
      case 0x8b: push_int(in_.long_int(get32(in_.take(4)))); break;
      case 'G': {
        PyNode* n = make(Kind::real);
        n->d = in_.binfloat();
        push(n);
        break;
      }
      case 'X': push_text(Kind::string, in_.text(get32(in_.take(4)))); break;
      case 0x8c: push_text(Kind::string, in_.text(*in_.take(1))); break;
      case 0x8d: push_text(Kind::string, in_.text(get64(in_.take(8)))); break;
      case 'B': push_text(Kind::bytes, in_.text(get32(in_.take(4)))); break;
      case 'C': push_text(Kind::bytes, in_.text(*in_.take(1))); break;
      case 0x8e: push_text(Kind::bytes, in_.text(get64(in_.take(8)))); break;
      case 'N': push(make(Kind::none)); break;
      case 0x88:
      case 0x89: {
        PyNode* n = make(Kind::boolean);
        n->b = op == 0x88;
        push(n);
        break;
      }
      case 'c': {
        const auto module = std::string(in_.line());
        const auto name = std::string(in_.line());
        global(module, name);
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        PyNode* name = pop();
        PyNode* module = pop();
        if (module->kind != Kind::string || name->kind != Kind::string) fail("STACK_GLOBAL without strings");
        global(module->s, name->s);
        break;
      }
      case 'q': memo_put(*in_.take(1)); break;
      case 'r': memo_put(get32(in_.take(4))); break;
      case 0x94: memo_put(memo_.size()); break;
      case 'h': memo_get(*in_.take(1)); break;
      case 'j': memo_get(get32(in_.take(4))); break;
      case 'R': apply(Kind::call, "REDUCE"); break;
      case 0x81: apply(Kind::object, "NEWOBJ"); break;
      case 'b': {
        PyNode* state = pop();
        PyNode* obj = top();
        if (obj->kind != Kind::object && obj->kind != Kind::call)
          fail(fmt::format("BUILD on a {}, not on an object", py_kind_name(obj->kind)));
        if (obj->state) fail("BUILD twice on one object");
        obj->state = state;
        break;
      }
      case '0': pop(); break;
      default: fail(fmt::format("opcode 0x{:02x} at offset {} is not one this reader accepts", op, at));
    }
  }

  void check_structure() const {
    check_tree(
        out_.root, out_.nodes.size(),
        [](const PyNode* n) {
          std::vector<const PyNode*> c(n->items.begin(), n->items.end());
          for (const auto& [k, v] : n->entries) {
            c.push_back(k);
            c.push_back(v);
          }
          if (n->state) c.push_back(n->state);
          return c;
        },
        [this](std::string_view what) { fail(what); });
  }

  PickleStream in_;
  const GlobalAllowed& allowed_;
  std::vector<PyNode*> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint64_t, PyNode*> memo_;
  std::unordered_map<std::string, PyNode*> globals_;
  PyPickle out_;
};

}  // namespace

PyPickle parse_py_pickle(std::string_view data, const std::string& what, const GlobalAllowed& allowed) {
  return PyUnpickler(data, what, allowed).run();
}

}  // namespace ckpt::detail
