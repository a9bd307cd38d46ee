#include "format/unpickler.hpp"

#include "format/dtypes.hpp"
#include "format/layout.hpp"
#include "format/pickle_stream.hpp"
#include "format/tree_check.hpp"
#include "format/zip.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <memory>
#include <unordered_map>

namespace ckpt::detail {
namespace {

enum class Global {
  ordered_dict,
  rebuild_tensor_v2,
  rebuild_parameter,
  rebuild_parameter_with_state,
  storage_type
};

struct StorageRef {
  std::string key;
  std::string location;
  c10::ScalarType dtype;
  std::int64_t numel;
};

/// A stack or memo entry: a plain value (a Node), or one of the things that only
/// exist while unpickling (a global, a storage reference, a tuple not yet
/// known to hold plain values).
struct Slot {
  enum class Kind { value, global, storage, tuple } kind = Kind::value;
  Node* node = nullptr;
  Global global = Global::ordered_dict;
  c10::ScalarType dtype = c10::ScalarType::Undefined;  // for Global::storage_type
  std::shared_ptr<const StorageRef> storage;
  std::shared_ptr<std::vector<Slot>> tuple;
  Node* tuple_node = nullptr;  // the tuple as a value, made once
  int depth = 0;               // nesting of tuple slots, bounded as they are built
};

bool plain_key(std::string_view key) {
  if (key.empty() || key == "." || key == ".." || key.size() > 256) return false;
  for (char c : key)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.')) return false;
  return true;
}

class Unpickler {
 public:
  Unpickler(std::string_view data, const std::filesystem::path& path, const StorageCheck& check)
      : in_(data, fmt::format("{}: bad pickle in data.pkl", path.string())), check_(check) {}

  Pickle run() {
    for (;;) {
      const std::size_t at = in_.pos();
      const auto opcode = in_.byte();
      if (opcode == '.') break;
      dispatch(opcode, at);
    }
    if (!marks_.empty()) fail("pickle ends with an open MARK");
    if (stack_.size() != 1)
      fail(fmt::format("pickle ends with {} values on its stack, not 1", stack_.size()));
    out_.root = value(stack_.back(), "the pickled object");
    check_structure(out_.root);
    return std::move(out_);
  }

 private:
  [[noreturn]] void fail(std::string_view what) const { in_.fail(what); }

  // --- the stack -----------------------------------------------------------
  Node* make(Node::Kind k) {
    Node& n = out_.nodes.emplace_back();
    n.kind = k;
    return &n;
  }
  void push_node(Node* n) {
    Slot s;
    s.node = n;
    stack_.push_back(std::move(s));
  }
  Slot pop() {
    if (stack_.size() <= (marks_.empty() ? 0 : marks_.back())) fail("pops from an empty stack");
    Slot s = std::move(stack_.back());
    stack_.pop_back();
    return s;
  }
  Slot& top() {
    if (stack_.size() <= (marks_.empty() ? 0 : marks_.back())) fail("reads an empty stack");
    return stack_.back();
  }
  std::vector<Slot> pop_mark() {
    if (marks_.empty()) fail("an opcode needs a MARK that is not there");
    const std::size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Slot> items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(m)),
                            std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }

  /// A slot as a plain value; `what` names it in errors.
  Node* value(Slot& s, std::string_view what) {
    switch (s.kind) {
      case Slot::Kind::value: return s.node;
      case Slot::Kind::tuple: {
        if (!s.tuple_node) {
          Node* t = make(Node::Kind::tuple);
          for (auto& e : *s.tuple) t->items.push_back(value(e, what));
          s.tuple_node = t;
        }
        return s.tuple_node;
      }
      case Slot::Kind::global: fail(fmt::format("{} is a bare global, not a value", what));
      case Slot::Kind::storage: fail(fmt::format("{} is a bare storage, not a value", what));
    }
    fail("unreachable");
  }
  Node* container(Slot& s, Node::Kind kind, std::string_view op) {
    if (s.kind != Slot::Kind::value || s.node->kind != kind)
      fail(fmt::format("{} on something that is not a {}", op, kind_name(kind)));
    return s.node;
  }
  std::int64_t as_int(Slot& s, std::string_view what) {
    Node* n = value(s, what);
    if (n->kind != Node::Kind::integer) fail(fmt::format("{} is a {}, not an int", what, kind_name(n->kind)));
    return n->i;
  }
  std::vector<std::int64_t> as_int_tuple(Slot& s, std::string_view what) {
    Node* n = value(s, what);
    if (n->kind != Node::Kind::tuple) fail(fmt::format("{} is a {}, not a tuple", what, kind_name(n->kind)));
    std::vector<std::int64_t> out;
    for (const Node* e : n->items) {
      if (e->kind != Node::Kind::integer)
        fail(fmt::format("{} holds a {}, not an int", what, kind_name(e->kind)));
      out.push_back(e->i);
    }
    return out;
  }

  void memo_put(std::uint64_t idx) { memo_[idx] = top(); }
  void memo_get(std::uint64_t idx) {
    auto it = memo_.find(idx);
    if (it == memo_.end()) fail(fmt::format("memo reference {} was never stored (dangling)", idx));
    stack_.push_back(it->second);
  }

  void dispatch(unsigned char op, std::size_t at) {
    switch (op) {
      case 0x80: {  // PROTO
        auto v = in_.byte();
        if (v > 5) fail(fmt::format("pickle protocol {} is unknown", v));
        break;
      }
      case 0x95: in_.take(8); break;  // FRAME: a hint only
      case '(': marks_.push_back(stack_.size()); break;
      case '}': push_node(make(Node::Kind::dict)); break;
      case ']': push_node(make(Node::Kind::list)); break;
      case ')': tuple({}); break;
      case 't': tuple(pop_mark()); break;
      case 0x85:
      case 0x86:
      case 0x87: {
        const std::size_t n = op - 0x84u;
        std::vector<Slot> items(n);
        for (std::size_t i = n; i-- > 0;) items[i] = pop();
        tuple(std::move(items));
        break;
      }
      case 'l': {
        auto items = pop_mark();
        Node* l = make(Node::Kind::list);
        for (auto& s : items) l->items.push_back(value(s, "a list item"));
        push_node(l);
        break;
      }
      case 'd': {
        auto items = pop_mark();
        Node* d = make(Node::Kind::dict);
        set_items(d, items);
        push_node(d);
        break;
      }
      case 'a': {
        Slot v = pop();
        Node* l = container(top(), Node::Kind::list, "APPEND");
        l->items.push_back(value(v, "a list item"));
        break;
      }
      case 'e': {
        auto items = pop_mark();
        Node* l = container(top(), Node::Kind::list, "APPENDS");
        for (auto& s : items) l->items.push_back(value(s, "a list item"));
        break;
      }
      case 's': {
        Slot v = pop();
        Slot k = pop();
        std::vector<Slot> kv{std::move(k), std::move(v)};
        set_items(container(top(), Node::Kind::dict, "SETITEM"), kv);
        break;
      }
      case 'u': {
        auto items = pop_mark();
        set_items(container(top(), Node::Kind::dict, "SETITEMS"), items);
        break;
      }
      case 'J': {
        auto p = in_.take(4);
        push_int(static_cast<std::int32_t>(get32(p)));
        break;
      }
      case 'K': push_int(*in_.take(1)); break;
      case 'M': push_int(get16(in_.take(2))); break;
      case 0x8a: push_int(in_.long_int(*in_.take(1))); break;
      case 0x8b: push_int(in_.long_int(get32(in_.take(4)))); break;
      case 'G': {
        Node* n = make(Node::Kind::real);
        n->d = in_.binfloat();
        push_node(n);
        break;
      }
      case 'X': push_str(in_.text(get32(in_.take(4)))); break;
      case 0x8c: push_str(in_.text(*in_.take(1))); break;
      case 0x8d: push_str(in_.text(get64(in_.take(8)))); break;
      case 'N': push_node(make(Node::Kind::none)); break;
      case 0x88:
      case 0x89: {
        Node* n = make(Node::Kind::boolean);
        n->b = op == 0x88;
        push_node(n);
        break;
      }
      case 'c': {
        auto module = std::string(in_.line());
        auto name = std::string(in_.line());
        global(module, name);
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        Slot name = pop();
        Slot module = pop();
        Node* m = value(module, "a STACK_GLOBAL module");
        Node* n = value(name, "a STACK_GLOBAL name");
        if (m->kind != Node::Kind::string || n->kind != Node::Kind::string)
          fail("STACK_GLOBAL without strings");
        global(m->s, n->s);
        break;
      }
      case 'q': memo_put(*in_.take(1)); break;
      case 'r': memo_put(get32(in_.take(4))); break;
      case 0x94: memo_put(memo_.size()); break;
      case 'h': memo_get(*in_.take(1)); break;
      case 'j': memo_get(get32(in_.take(4))); break;
      case 'Q': persistent_id(pop()); break;
      case 'R': {
        Slot args = pop();
        Slot fn = pop();
        reduce(fn, args);
        break;
      }
      case 'b': {
        Slot state = pop();
        Slot& obj = top();
        // OrderedDict instance attributes (state_dict()._metadata) and tensor
        // attributes carry nothing a checkpoint needs: they are dropped.
        if (obj.kind != Slot::Kind::value ||
            (obj.node->kind != Node::Kind::dict && obj.node->kind != Node::Kind::tensor))
          fail("BUILD on something other than an OrderedDict or a tensor");
        (void)state;
        break;
      }
      case '0': pop(); break;
      default:
        fail(fmt::format("opcode 0x{:02x} at offset {} is not one torch.save writes for a state dict", op,
                         at));
    }
  }

  void push_int(std::int64_t v) {
    Node* n = make(Node::Kind::integer);
    n->i = v;
    push_node(n);
  }
  void push_str(std::string_view s) {
    Node* n = make(Node::Kind::string);
    n->s.assign(s);
    push_node(n);
  }
  void tuple(std::vector<Slot> items) {
    // Tuple slots nest by pointer; bound them now so that neither materializing
    // nor destroying them can recurse without limit.
    int depth = 0;
    for (const auto& s : items) depth = std::max(depth, s.depth);
    if (depth + 1 > kMaxNesting) fail(fmt::format("containers nest deeper than {} levels", kMaxNesting));
    Slot t;
    t.kind = Slot::Kind::tuple;
    t.tuple = std::make_shared<std::vector<Slot>>(std::move(items));
    t.depth = depth + 1;
    stack_.push_back(std::move(t));
  }

  void set_items(Node* d, std::vector<Slot>& kv) {
    if (kv.size() % 2 != 0) fail("SETITEMS with an odd number of items");
    for (std::size_t i = 0; i < kv.size(); i += 2) {
      Node* k = value(kv[i], "a dict key");
      if (k->kind != Node::Kind::string && k->kind != Node::Kind::integer && k->kind != Node::Kind::boolean &&
          k->kind != Node::Kind::real)
        fail(fmt::format("a dict key is a {}", kind_name(k->kind)));
      d->entries.emplace_back(k, value(kv[i + 1], "a dict value"));
    }
  }

  void global(const std::string& module, const std::string& name) {
    Slot s;
    s.kind = Slot::Kind::global;
    if (module == "collections" && name == "OrderedDict")
      s.global = Global::ordered_dict;
    else if (module == "torch._utils" && name == "_rebuild_tensor_v2")
      s.global = Global::rebuild_tensor_v2;
    else if (module == "torch._utils" && name == "_rebuild_parameter")
      s.global = Global::rebuild_parameter;
    else if (module == "torch._utils" && name == "_rebuild_parameter_with_state")
      s.global = Global::rebuild_parameter_with_state;
    else if (module == "torch" && dtype_of_storage(name) != c10::ScalarType::Undefined) {
      s.global = Global::storage_type;
      s.dtype = dtype_of_storage(name);
    } else {
      in_.fail<RefusedGlobal>(fmt::format(
          "refusing global '{}.{}': not a state-dict type (loading never runs code)", module, name));
    }
    stack_.push_back(std::move(s));
  }

  void persistent_id(Slot id) {
    if (id.kind != Slot::Kind::tuple || id.tuple->size() != 5)
      fail("a persistent id is not a 5-tuple ('storage', type, key, location, numel)");
    auto& t = *id.tuple;
    Node* tag = value(t[0], "the persistent id's tag");
    if (tag->kind != Node::Kind::string || tag->s != "storage")
      fail("a persistent id does not start with 'storage'");
    if (t[1].kind != Slot::Kind::global || t[1].global != Global::storage_type)
      fail("a persistent id's storage type is not a torch storage class");
    Node* key = value(t[2], "the storage key");
    Node* loc = value(t[3], "the storage location");
    if (key->kind != Node::Kind::string || loc->kind != Node::Kind::string)
      fail("a storage key or location is not a string");
    if (!plain_key(key->s))
      fail(fmt::format("storage key '{}' is not a plain record name (it may not leave the archive's data/)",
                       key->s));
    const std::int64_t numel = as_int(t[4], "the storage size");
    if (numel < 0) fail(fmt::format("storage {} has a negative size {}", key->s, numel));
    auto known = storages_.find(key->s);
    if (known != storages_.end()) {
      if (known->second->dtype != t[1].dtype || known->second->numel != numel)
        fail(fmt::format("storage {} is described twice, differently", key->s));
      Slot s;
      s.kind = Slot::Kind::storage;
      s.storage = known->second;
      stack_.push_back(std::move(s));
      return;
    }
    check_(key->s, t[1].dtype, numel);
    auto ref = std::make_shared<StorageRef>(StorageRef{key->s, loc->s, t[1].dtype, numel});
    storages_.emplace(key->s, ref);
    Slot s;
    s.kind = Slot::Kind::storage;
    s.storage = std::move(ref);
    stack_.push_back(std::move(s));
  }

  void reduce(Slot& fn, Slot& args) {
    if (fn.kind != Slot::Kind::global) fail("REDUCE calls something that is not an allowed global");
    if (args.kind != Slot::Kind::tuple) fail("REDUCE arguments are not a tuple");
    auto& a = *args.tuple;
    switch (fn.global) {
      case Global::ordered_dict: {
        if (!a.empty()) fail("OrderedDict is built with arguments");
        Node* d = make(Node::Kind::dict);
        d->ordered = true;
        push_node(d);
        return;
      }
      case Global::rebuild_tensor_v2: push_node(rebuild_tensor(a)); return;
      case Global::rebuild_parameter:
      case Global::rebuild_parameter_with_state: {
        if (a.size() < 2) fail("_rebuild_parameter with too few arguments");
        Node* data = value(a[0], "a parameter's data");
        if (data->kind != Node::Kind::tensor) fail("_rebuild_parameter of something that is not a tensor");
        Node* rg = value(a[1], "a parameter's requires_grad");
        if (rg->kind != Node::Kind::boolean) fail("a parameter's requires_grad is not a bool");
        auto info = std::make_shared<TensorInfo>(*data->tensor);
        info->requires_grad = rg->b;
        info->is_parameter = true;
        Node* n = make(Node::Kind::tensor);
        n->tensor = std::move(info);
        push_node(n);
        return;
      }
      case Global::storage_type: fail("REDUCE calls a storage class");
    }
  }

  Node* rebuild_tensor(std::vector<Slot>& a) {
    if (a.size() != 6 && a.size() != 7)
      fail(fmt::format("_rebuild_tensor_v2 with {} arguments, not 6 or 7", a.size()));
    if (a[0].kind != Slot::Kind::storage) fail("_rebuild_tensor_v2 of something that is not a storage");
    const StorageRef& st = *a[0].storage;
    auto info = std::make_shared<TensorInfo>();
    info->storage_key = st.key;
    info->location = st.location;
    info->dtype = st.dtype;
    info->storage_numel = st.numel;
    info->storage_offset = as_int(a[1], "a tensor's storage offset");
    info->sizes = as_int_tuple(a[2], "a tensor's size");
    info->strides = as_int_tuple(a[3], "a tensor's stride");
    Node* rg = value(a[4], "a tensor's requires_grad");
    if (rg->kind != Node::Kind::boolean) fail("a tensor's requires_grad is not a bool");
    info->requires_grad = rg->b;
    check_view(*info);
    Node* n = make(Node::Kind::tensor);
    n->tensor = std::move(info);
    return n;
  }

  /// No view may reach outside its storage, and no size may overflow.
  void check_view(const TensorInfo& t) const {
    const auto where = [&] { return fmt::format("tensor on storage {}", t.storage_key); };
    if (t.sizes.size() != t.strides.size())
      fail(fmt::format("{} has {} sizes but {} strides", where(), t.sizes.size(), t.strides.size()));
    if (t.sizes.size() > 64) fail(fmt::format("{} has {} dimensions", where(), t.sizes.size()));
    if (t.storage_offset < 0)
      fail(fmt::format("{} has a negative storage offset {}", where(), t.storage_offset));
    std::int64_t numel = 1;
    std::int64_t last = t.storage_offset;  // highest element index reached
    for (std::size_t d = 0; d < t.sizes.size(); ++d) {
      if (t.sizes[d] < 0) fail(fmt::format("{} has a negative size {}", where(), t.sizes[d]));
      if (t.strides[d] < 0) fail(fmt::format("{} has a negative stride {}", where(), t.strides[d]));
      if (__builtin_mul_overflow(numel, t.sizes[d], &numel))
        fail(fmt::format("{}: its size overflows 64 bits", where()));
    }
    if (numel == 0) {
      if (t.storage_offset > t.storage_numel)
        fail(fmt::format("{}: offset {} is past its storage of {} elements", where(), t.storage_offset,
                         t.storage_numel));
      return;
    }
    for (std::size_t d = 0; d < t.sizes.size(); ++d) {
      std::int64_t reach = 0;
      if (__builtin_mul_overflow(t.sizes[d] - 1, t.strides[d], &reach) ||
          __builtin_add_overflow(last, reach, &last))
        fail(fmt::format("{}: its strides overflow 64 bits", where()));
    }
    if (last >= t.storage_numel)
      fail(fmt::format("{}: the view (offset {}, size {}, stride {}) reaches element {} of a storage of {}",
                       where(), t.storage_offset, fmt::join(t.sizes, "x"), fmt::join(t.strides, ","), last,
                       t.storage_numel));
  }

  void check_structure(const Node* root) const {
    check_tree(
        root, out_.nodes.size(),
        [](const Node* n) {
          std::vector<const Node*> c(n->items.begin(), n->items.end());
          for (const auto& [k, v] : n->entries) {
            c.push_back(k);
            c.push_back(v);
          }
          return c;
        },
        [this](std::string_view what) { fail(what); });
  }

  PickleStream in_;
  const StorageCheck& check_;
  std::vector<Slot> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint64_t, Slot> memo_;
  std::unordered_map<std::string, std::shared_ptr<const StorageRef>> storages_;
  Pickle out_;
};

}  // namespace

Pickle unpickle(std::string_view data, const std::filesystem::path& path, const StorageCheck& check) {
  return Unpickler(data, path, check).run();
}

}  // namespace ckpt::detail
