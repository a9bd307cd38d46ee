"""The values both sides of the interop tests agree on, and an exact comparison.

tests/interop_test.cpp builds the very same values in C++ (expected_values()
there): every tensor comes from a deterministic recipe (arange patterns, a fixed
list of special floats) run through the same torch kernels on both sides, so
both sides can rebuild the expected tensors themselves and compare bit for bit.

Keep this file and interop_test.cpp in step.
"""

import collections
import os
import math
import struct

import torch

# name -> dtype, in the order both sides use.
DTYPES = collections.OrderedDict([
    ("f32", torch.float32),
    ("f64", torch.float64),
    ("f16", torch.float16),
    ("bf16", torch.bfloat16),
    ("i8", torch.int8),
    ("u8", torch.uint8),
    ("i16", torch.int16),
    ("i32", torch.int32),
    ("i64", torch.int64),
    ("bool", torch.bool),
    ("c64", torch.complex64),
    ("c128", torch.complex128),
])

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
COMPLEX = (torch.complex64, torch.complex128)

# Special floats: rounding (0.1, 1/3), signed zero, infinities, NaN, overflow in
# the narrow types (1e300, 65504 + 1), the smallest subnormal of f64 and f32.
SPECIALS = [0.1, -0.0, math.inf, -math.inf, math.nan, 1e300, -1e-300, 5e-324, 65504.0, 65505.0,
            1.0 / 3.0, 3.4028234663852886e38, 1.401298464324817e-45, -2.5]

EXTREMES = {
    torch.int8: [-128, 127, 0, -1, 1],
    torch.uint8: [0, 255, 1, 128, 127],
    torch.int16: [-32768, 32767, 0, -1, 1],
    torch.int32: [-2**31, 2**31 - 1, 0, -1, 1],
    torch.int64: [-2**63, 2**63 - 1, 0, -1, 2**40],
    torch.bool: [True, False, False, True],
}

UNICODE = "h\u00e9llo w\u00f6rld \u2014 \u65e5\u672c\u8a9e \U0001F680 \u0000 end"
UNICODE_KEY = "schl\u00fcssel_\u043a\u043b\u044e\u0447"
PLAIN_FLOATS = [0.1, -0.0, 0.0, 1e300, -1e-300, 5e-324, math.inf, -math.inf, math.nan, 1.0 / 3.0,
                2.0**53 + 2.0, -2.5]


def pattern(dtype):
    """A (2, 3, 4) tensor of `dtype` with distinct, deterministic values."""
    base = torch.arange(24, dtype=torch.float64)
    if dtype == torch.bool:
        out = torch.arange(24, dtype=torch.int64).remainder(3) == 0
    elif dtype in COMPLEX:
        out = torch.complex(base * 0.25 - 2.5, base * -1.5 + 7.0).to(dtype)
    elif dtype in FLOATING:
        out = (base * 0.25 - 2.5).to(dtype)
    else:  # integers, wrapping where the type is narrow
        out = (torch.arange(24, dtype=torch.int64) * 37 - 300).to(dtype)
    return out.reshape(2, 3, 4)


def specials(dtype):
    """The special values of `dtype`: SPECIALS for floats, EXTREMES for integers."""
    if dtype in FLOATING:
        return torch.tensor(SPECIALS, dtype=torch.float64).to(dtype)
    if dtype in COMPLEX:
        s = torch.tensor(SPECIALS, dtype=torch.float64)
        return torch.complex(s, s.flip(0)).to(dtype)
    if dtype == torch.bool:
        return torch.tensor(EXTREMES[dtype], dtype=torch.bool)
    return torch.tensor(EXTREMES[dtype], dtype=torch.int64).to(dtype)


def expected_values(python_side):
    """The checkpoint both sides write and read.

    python_side: True for what torch.save writes (an OrderedDict, a Parameter);
    False for what ckpt writes and torch.load gives back (a plain dict, a plain
    tensor that requires grad).
    """
    v = {}
    v["dtypes"] = {name: pattern(dt) for name, dt in DTYPES.items()}
    v["specials"] = {name: specials(dt) for name, dt in DTYPES.items()}
    v["scalars"] = {name: pattern(dt).flatten()[5].clone() for name, dt in DTYPES.items()}
    v["empty"] = {
        "f32_0": torch.empty(0, dtype=torch.float32),
        "i16_2x0": torch.zeros(2, 0, dtype=torch.int16),
        "c64_0x3": torch.zeros(0, 3, dtype=torch.complex64),
        "bool_0": torch.zeros(0, dtype=torch.bool),
    }
    # Views of one storage: all of these share `base`'s storage.
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    v["views"] = {
        "base": base,
        "transposed": base.t(),
        "sliced": base[1:5:2, 3:9:3],
        "row": base[4],
        "element": base[5, 7],
    }
    # Views saved without their base: the whole storage goes along.
    v["lonely_transposed"] = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()
    v["lonely_slice"] = torch.arange(100, dtype=torch.int32)[10:20:3]
    v["expanded"] = torch.arange(3, dtype=torch.int16).expand(4, 3)
    # Two tensors sharing one storage from different containers.
    shared = torch.arange(16, dtype=torch.int64)
    v["shared"] = {"a": shared}
    v["shared_list"] = [shared.view(4, 4)[1:3], "not a tensor"]
    grad = torch.arange(4, dtype=torch.float32) * 0.5
    v["requires_grad"] = torch.nn.Parameter(grad) if python_side else grad.requires_grad_()
    ordered = collections.OrderedDict([("z", 1), ("a", 2), ("m", [3])])
    v["nested"] = {
        "list": [1, 2.5, "x", None, True, [3, (4, 5)], {"k": "v"}],
        "tuple": (1, "two", 3.0, None, False, (), [], {}),
        "ordered": ordered if python_side else dict(ordered),
        "int_keys": {0: "zero", -5: "minus five", 2**40: "big", 7: {1: [2]}},
        "deep": {"a": {"b": {"c": {"d": [[[(torch.arange(3, dtype=torch.int8),)]]]}}}},
        "empty_dict": {},
        "empty_list": [],
        "empty_tuple": (),
    }
    v["unicode"] = UNICODE
    v[UNICODE_KEY] = UNICODE_KEY
    v["empty_string"] = ""
    v["big"] = 2**40
    v["ints"] = [0, 1, -1, 255, 256, 65535, 65536, -2**31, 2**31 - 1, 2**31, -2**63, 2**63 - 1, -2**40]
    v["floats"] = PLAIN_FLOATS
    v["none"] = None
    v["true"] = True
    v["false"] = False
    return v


# Pairs of key paths whose tensors share one storage; and groups that must not.
SHARED_GROUPS = [
    [("views", "base"), ("views", "transposed"), ("views", "sliced"), ("views", "row"),
     ("views", "element")],
    [("shared", "a"), ("shared_list", 0)],
]


def at_path(v, path):
    for p in path:
        v = v[p]
    return v


def float_bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def tensor_bytes(t):
    """The bytes of `t` in logical (row-major) order."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).tolist() if t.numel() else []


class Mismatch(Exception):
    pass


def _dict_like(x):
    return type(x) in (dict, collections.OrderedDict)


def compare(got, want, path="<root>", dict_types_strict=True):
    """Raises Mismatch naming the first difference between `got` and `want`.

    Types must match exactly (bool is not int, tuple is not list; dict and
    OrderedDict only when dict_types_strict is False); floats bit for bit (NaN
    any NaN); tensors in dtype, shape, strides, storage offset, requires_grad
    and every byte.
    """
    if torch.is_tensor(want):
        if not torch.is_tensor(got):
            raise Mismatch(f"{path}: expected a tensor, got {type(got).__name__}")
        for what, g, w in (("dtype", got.dtype, want.dtype), ("shape", tuple(got.shape), tuple(want.shape)),
                           ("stride", got.stride(), want.stride()),
                           ("storage_offset", got.storage_offset(), want.storage_offset()),
                           ("requires_grad", got.requires_grad, want.requires_grad),
                           ("device", got.device, want.device)):
            if g != w:
                raise Mismatch(f"{path}: {what} is {g}, expected {w}")
        if type(got) is not type(want):
            raise Mismatch(f"{path}: tensor class is {type(got).__name__}, expected {type(want).__name__}")
        gb, wb = tensor_bytes(got), tensor_bytes(want)
        if gb != wb:
            first = next(i for i, (a, b) in enumerate(zip(gb, wb)) if a != b)
            raise Mismatch(f"{path}: bytes differ (first at byte {first}): got {got!r}, expected {want!r}")
        return
    if _dict_like(want) and not dict_types_strict:
        if not _dict_like(got):
            raise Mismatch(f"{path}: expected a dict, got {type(got).__name__}")
    elif type(got) is not type(want):
        raise Mismatch(f"{path}: type is {type(got).__name__}, expected {type(want).__name__}: "
                       f"got {got!r}, expected {want!r}")
    if _dict_like(want):
        if list(got.keys()) != list(want.keys()):
            raise Mismatch(f"{path}: keys are {list(got.keys())!r}, expected {list(want.keys())!r} (in order)")
        for k in want:
            compare(got[k], want[k], f"{path}[{k!r}]", dict_types_strict)
    elif isinstance(want, (list, tuple)):
        if len(got) != len(want):
            raise Mismatch(f"{path}: length {len(got)}, expected {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, f"{path}[{i}]", dict_types_strict)
    elif isinstance(want, float):
        if math.isnan(want):
            if not math.isnan(got):
                raise Mismatch(f"{path}: {got!r}, expected NaN")
        elif float_bits(got) != float_bits(want):
            raise Mismatch(f"{path}: {got!r} (bits {float_bits(got):016x}), expected {want!r} "
                           f"(bits {float_bits(want):016x})")
    elif got != want:
        raise Mismatch(f"{path}: {got!r}, expected {want!r}")


def storage_ptr(t):
    return t.storage().data_ptr()


def check_sharing(loaded):
    """Tensors of one group share a storage (and a write through one is seen in
    the others); tensors of different groups do not."""
    ptrs = []
    for group in SHARED_GROUPS:
        tensors = [at_path(loaded, p) for p in group]
        group_ptrs = {storage_ptr(t) for t in tensors}
        if len(group_ptrs) != 1:
            raise Mismatch(f"tensors {group} should share one storage but have {len(group_ptrs)}")
        ptrs.append(group_ptrs.pop())
    if len(set(ptrs)) != len(ptrs):
        raise Mismatch("distinct storages were merged into one")
    # Write through one view, read through the others.
    with torch.no_grad():
        views = loaded["views"]
        views["sliced"][1, 1] = -1234.0  # base[3, 6]
        for name, where in (("base", (3, 6)), ("transposed", (6, 3))):
            if views[name][where].item() != -1234.0:
                raise Mismatch(f"views.{name}{where} does not see a write through views.sliced")
        views["row"][7] = -99.0  # base[4, 7]
        if views["base"][4, 7].item() != -99.0 or views["transposed"][7, 4].item() != -99.0:
            raise Mismatch("views.base does not see a write through views.row")
        views["element"].fill_(4321.0)  # base[5, 7]
        if views["base"][5, 7].item() != 4321.0:
            raise Mismatch("views.base does not see a write through views.element")
        loaded["shared"]["a"][5] = 555  # shared_list[0][0, 1]
        if loaded["shared_list"][0][0, 1].item() != 555:
            raise Mismatch("shared_list[0] does not see a write through shared.a")


def torch2_values():
    """What the hand-made torch 2.x layout file holds."""
    x = torch.arange(10, dtype=torch.float32) * 0.5
    return {
        "weight": pattern(torch.float32),
        "bias": specials(torch.bfloat16),
        "shared_a": x,
        "shared_b": x[2:7],
        "step": 7,
        "name": "torch2",
        "nested": {1: (2.5, None)},
    }


TORCH_DTYPE_NAMES = {dt: str(dt) for dt in DTYPES.values()}


def dump(obj):
    """A canonical text form of a loaded checkpoint, one line per node, that
    interop_test.cpp reproduces from what ckpt loads (dump() there). Strings are
    hex UTF-8, floats their bits, tensors their metadata and bytes."""
    lines = []

    def key_text(k):
        if isinstance(k, bool):
            return "b%d" % k
        if isinstance(k, int):
            return "i%d" % k
        if isinstance(k, str):
            return "s" + k.encode("utf-8").hex()
        if isinstance(k, float):
            return "f%016x" % float_bits(k)
        raise Mismatch(f"unexpected key type {type(k).__name__}")

    def walk(v, path):
        if torch.is_tensor(v):
            lines.append("%s tensor %s [%s] [%s] %d rg=%d %s" % (
                path, v.dtype, ",".join(map(str, v.shape)), ",".join(map(str, v.stride())),
                v.storage_offset(), v.requires_grad, bytes(tensor_bytes(v)).hex()))
        elif _dict_like(v):
            lines.append("%s dict %d" % (path, len(v)))
            for k, x in v.items():
                walk(x, path + "/" + key_text(k))
        elif isinstance(v, list):
            lines.append("%s list %d" % (path, len(v)))
            for i, x in enumerate(v):
                walk(x, "%s/%d" % (path, i))
        elif isinstance(v, tuple):
            lines.append("%s tuple %d" % (path, len(v)))
            for i, x in enumerate(v):
                walk(x, "%s/%d" % (path, i))
        elif v is None:
            lines.append("%s none" % path)
        elif isinstance(v, bool):
            lines.append("%s bool %d" % (path, v))
        elif isinstance(v, int):
            lines.append("%s int %d" % (path, v))
        elif isinstance(v, float):
            lines.append("%s float %016x" % (path, float_bits(v)))
        elif isinstance(v, str):
            lines.append("%s str %s" % (path, v.encode("utf-8").hex()))
        else:
            raise Mismatch(f"{path}: cannot dump a {type(v).__name__}")

    walk(obj, "$")
    return "\n".join(lines) + "\n"


def quiet_torch2_warnings():
    """Silences the torch 2.x warnings the DCP interop scripts trigger on
    purpose (no process group, DTensor on CPU) and the hostname lookup of
    gloo on loopback."""
    import warnings
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for message in ("torch.distributed is unavailable or uninitialized", "TypedStorage is deprecated",
                    "DTensor random operators may not have complete support"):
        warnings.filterwarnings("ignore", message=message)


def free_port():
    """A TCP port free on 127.0.0.1 now (for a gloo rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
