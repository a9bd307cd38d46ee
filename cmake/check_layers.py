#!/usr/bin/env python3
"""The layering check: fails when a source includes a higher layer's header,
a header that its layer must not see (Asio in the synchronous layers, c10d
below dist), or when two components include each other (an include cycle).

usage: check_layers.py SOURCE_DIR [STAMP]

The layers, bottom up (docs/architecture.md explains them):

  core        errors, StateDict, small types, configuration, POSIX I/O, logging
  format      zip, pickle writer, allowlisted unpickler, layout, file writer/reader
  dist        the barrier interface and registry, TCPStore barrier, c10d groups
  checkpoint  writer, reader, sync checkpointer, commit marker, manager
  async       stager, arena, device copies, the writer child and its protocol
  dcp         planners, storage layers, save/load over a process group
  dcp_async   the asynchronous DCP save (AsyncSaver): dcp over the stager and the child

A layer's files are lib/<layer>/* and the public headers assigned to it below.
"""
import os
import re
import sys

# Each layer and the layers it may include (the link dependencies of its
# CMake target say the same).
LAYERS = {
    "core": [],
    "format": ["core"],
    "dist": ["core"],
    "checkpoint": ["core", "format", "dist"],
    "async": ["core", "format", "dist", "checkpoint"],
    "dcp": ["core", "format", "dist"],
    "dcp_async": ["core", "format", "dist", "checkpoint", "async", "dcp"],
}

# Every public header belongs to one layer (include paths are API, so the
# headers stay flat under include/ckpt/). ckpt.hpp includes them all and
# belongs to none: no library file may include it.
PUBLIC = {
    "error.hpp": "core",
    "types.hpp": "core",
    "state_dict.hpp": "core",
    "config.hpp": "core",
    "log.hpp": "core",
    "format.hpp": "format",
    "safetensors.hpp": "format",
    "barrier.hpp": "dist",
    "tcp_store_barrier.hpp": "dist",
    "dist.hpp": "dist",
    "checkpoint_writer.hpp": "checkpoint",
    "checkpoint_reader.hpp": "checkpoint",
    "checkpointer.hpp": "checkpoint",
    "commit.hpp": "checkpoint",
    "checkpoint_manager.hpp": "checkpoint",
    "staging.hpp": "async",
    "checkpoint_process.hpp": "async",
    "async_checkpointer.hpp": "async",
    "writer_main.hpp": "async",
    "dcp/metadata.hpp": "dcp",
    "dcp/planner.hpp": "dcp",
    "dcp/storage.hpp": "dcp",
    "dcp/hf_storage.hpp": "dcp",
    "dcp/convert.hpp": "dcp",
    "dcp/state_dict_saver.hpp": "dcp",
    "dcp/async_saver.hpp": "dcp_async",
}
UMBRELLA = "ckpt.hpp"

ASIO = ["boost/asio", "boost/process"]
C10D = ["torch/csrc/distributed", "ckpt/dist.hpp", "ckpt/tcp_store_barrier.hpp"]
# Headers a layer must not include, whatever the layer order says.
FORBIDDEN = {
    "core": ASIO + C10D,
    "format": ASIO + C10D,
    "dist": ASIO,
    "checkpoint": ASIO + C10D,
    "dcp": ASIO,
}
# Single files with a stricter rule: the barrier interface knows nothing of c10d.
FORBIDDEN_FILES = {
    "include/ckpt/barrier.hpp": C10D,
    "lib/dist/barrier.cpp": C10D,
}

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')


def layer_files(root):
    """(relative path, layer) for every file of every layer."""
    out = []
    for layer in LAYERS:
        folder = os.path.join(root, "lib", layer)
        for dirpath, _, names in os.walk(folder):
            for n in sorted(names):
                if n.endswith((".cpp", ".hpp", ".h")):
                    out.append((os.path.relpath(os.path.join(dirpath, n), root), layer))
    for header, layer in PUBLIC.items():
        out.append((os.path.join("include", "ckpt", header), layer))
    return out


def includes(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            m = INCLUDE.match(line)
            if m:
                yield number, m.group(1), m.group(2)


def target_of(root, rel, kind, name):
    """The project file an include names, or None for an outside header."""
    if kind == "<":
        if name.startswith("ckpt/"):
            return os.path.join("include", name)
        return None
    for candidate in (os.path.join("lib", name), os.path.join(os.path.dirname(rel), name)):
        if os.path.exists(os.path.join(root, candidate)):
            return os.path.normpath(candidate)
    return os.path.join("lib", name)  # reported as unknown below


def component(rel):
    """A header and the source that defines it are one component: its stem."""
    stem = os.path.splitext(os.path.basename(rel))[0]
    if rel.startswith("include/ckpt/dcp/") or rel.startswith("lib/dcp/"):
        return "dcp/" + stem
    return stem


def main():
    root = os.path.abspath(sys.argv[1])
    stamp = sys.argv[2] if len(sys.argv) > 2 else None
    files = layer_files(root)
    layer_of = {rel: layer for rel, layer in files}
    problems = []
    edges = {}

    public_dir = os.path.join(root, "include", "ckpt")
    for dirpath, _, names in os.walk(public_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), os.path.join(root, "include", "ckpt"))
            if rel != UMBRELLA and rel not in PUBLIC:
                problems.append(f"include/ckpt/{rel}: a public header in no layer (add it to PUBLIC in {__file__})")
    for folder in sorted(os.listdir(os.path.join(root, "lib"))):
        if os.path.isdir(os.path.join(root, "lib", folder)) and folder not in LAYERS:
            problems.append(f"lib/{folder}: a folder that is not a layer")
        elif os.path.isfile(os.path.join(root, "lib", folder)) and folder.endswith((".cpp", ".hpp")):
            problems.append(f"lib/{folder}: a source outside every layer folder")

    for rel, layer in files:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            problems.append(f"{rel}: listed in PUBLIC but missing")
            continue
        allowed = set(LAYERS[layer]) | {layer}
        forbidden = FORBIDDEN.get(layer, []) + FORBIDDEN_FILES.get(rel, [])
        for number, kind, name in includes(path):
            where = f"{rel}:{number}"
            for bad in forbidden:
                if name.startswith(bad):
                    problems.append(f"{where}: includes <{name}>, which layer '{layer}' must not see")
            target = target_of(root, rel, kind, name)
            if target is None:
                continue
            if target == os.path.join("include", "ckpt", UMBRELLA):
                problems.append(f"{where}: includes the umbrella header ckpt.hpp")
                continue
            if target not in layer_of:
                problems.append(f"{where}: includes '{name}', which is in no layer")
                continue
            to = layer_of[target]
            if to not in allowed:
                problems.append(f"{where}: layer '{layer}' includes '{name}' of layer '{to}' "
                                f"(allowed: {', '.join(sorted(allowed))})")
            a, b = component(rel), component(target)
            if a != b:
                edges.setdefault(a, {}).setdefault(b, where)

    # Include cycles between components (Tarjan's strongly connected components).
    index, low, stack, on_stack, counter = {}, {}, [], set(), [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                members = sorted(scc)
                links = [f"{a} -> {b} ({edges[a][b]})" for a in members for b in edges.get(a, {}) if b in scc]
                problems.append("include cycle between " + ", ".join(members) + ": " + "; ".join(links))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)

    if problems:
        print("layering check failed:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    if stamp:
        with open(stamp, "w") as f:
            f.write("ok\n")
    print(f"layering check: {len(files)} files in {len(LAYERS)} layers, no upward include, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
