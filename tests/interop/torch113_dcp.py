"""Makes torch 1.13's checkpoint package importable on Python 3.11.

torch 1.13 declares some dataclass fields of torch.distributed._shard with a
mutable default (a TensorProperties instance), which Python 3.11's dataclasses
reject when the module is imported. Importing this module first turns such
defaults into default_factory copies, which is what 3.11 asks for; nothing
else changes. Then `torch.distributed._shard.checkpoint` imports.
"""

import copy
import dataclasses

_get_field = dataclasses._get_field


def _get_field_with_copied_defaults(cls, a_name, a_type, *args):
    default = cls.__dict__.get(a_name, dataclasses.MISSING)
    if isinstance(default, dataclasses.Field):
        value = default.default
        if value is not dataclasses.MISSING and value.__class__.__hash__ is None:
            default.default = dataclasses.MISSING
            default.default_factory = lambda v=value: copy.deepcopy(v)
    elif default is not dataclasses.MISSING and default.__class__.__hash__ is None:
        setattr(cls, a_name, dataclasses.field(default_factory=lambda v=default: copy.deepcopy(v)))
    return _get_field(cls, a_name, a_type, *args)


dataclasses._get_field = _get_field_with_copied_defaults
