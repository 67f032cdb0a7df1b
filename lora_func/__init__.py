"""lora_func: LoRA for PyTorch, as pure functions over adapter pytrees and as the classic
``nn.Module`` parametrization.

The functional core: :class:`LoRA` (the adapter pytree node), :func:`init`, :func:`delta`,
:func:`merge`, :func:`init_adapters`, :func:`effective_params`, :func:`stack`,
:func:`unstack`. The stateful layer over it: :class:`LoRAParam`, :func:`apply_lora`,
:func:`remove_lora`, and the bridge :func:`get_adapters` / :func:`set_adapters`.
"""

from ._arith import add as add
from ._arith import mean as mean
from ._arith import scale as scale
from ._arith import truncate as truncate
from ._arith import weighted_sum as weighted_sum
from ._bridge import get_adapters as get_adapters
from ._bridge import module_params as module_params
from ._bridge import set_adapters as set_adapters
from ._dist import all_reduce_grads as all_reduce_grads
from ._files import check as check
from ._files import load as load
from ._files import load_metadata as load_metadata
from ._files import save as save
from ._math import INITS as INITS
from ._math import delta as delta
from ._math import init as init
from ._math import merge as merge
from ._merge_error import merge_error as merge_error
from ._peft import export_peft as export_peft
from ._peft import from_state_dict as from_state_dict
from ._peft import import_peft as import_peft
from ._peft import to_state_dict as to_state_dict
from ._routing import RoutedLoRAWeight as RoutedLoRAWeight
from ._stateful import LoRAParam as LoRAParam
from ._stateful import apply_lora as apply_lora
from ._stateful import remove_lora as remove_lora
from ._targets import base_params as base_params
from ._targets import effective_params as effective_params
from ._targets import init_adapters as init_adapters
from ._targets import lora_params as lora_params
from ._train import adapter_norms as adapter_norms
from ._train import assign_grads as assign_grads
from ._train import clip_per_adapter as clip_per_adapter
from ._train import init_stack as init_stack
from ._train import pick as pick
from ._tree import LoRA as LoRA
from ._tree import is_lora as is_lora
from ._tree import stack as stack
from ._tree import trainable as trainable
from ._tree import unstack as unstack
from ._weight import LoRAWeight as LoRAWeight

__version__ = "0.1.0"

__all__ = [
    "INITS",
    "LoRA",
    "LoRAParam",
    "LoRAWeight",
    "RoutedLoRAWeight",
    "adapter_norms",
    "add",
    "all_reduce_grads",
    "apply_lora",
    "assign_grads",
    "base_params",
    "check",
    "clip_per_adapter",
    "delta",
    "effective_params",
    "export_peft",
    "from_state_dict",
    "get_adapters",
    "import_peft",
    "init",
    "init_adapters",
    "init_stack",
    "is_lora",
    "load",
    "load_metadata",
    "lora_params",
    "mean",
    "merge",
    "merge_error",
    "module_params",
    "pick",
    "remove_lora",
    "save",
    "scale",
    "set_adapters",
    "stack",
    "to_state_dict",
    "trainable",
    "truncate",
    "unstack",
    "weighted_sum",
]
