"""Writes small torch.save checkpoints (torch 1.x layout) to seed the fuzzer."""
import collections
import sys

import torch

out = sys.argv[1]
torch.manual_seed(0)
m = torch.nn.Linear(3, 2)
torch.save(m.state_dict(), f"{out}/linear.pt")
opt = torch.optim.Adam(m.parameters())
m(torch.ones(1, 3)).sum().backward()
opt.step()
torch.save(opt.state_dict(), f"{out}/adam.pt")
x = torch.arange(6, dtype=torch.int16)
torch.save({"a": x, "b": x[2:], "c": [1, 2.5, None, True, "t"], "d": collections.OrderedDict(k=(1, 2))},
           f"{out}/mixed.pt")
torch.save(torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)), f"{out}/param.pt")
