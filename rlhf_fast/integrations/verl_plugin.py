"""The `verl.plugins` entry point (pyproject: `rlhf_fast = "rlhf_fast.integrations.verl_plugin"`): importing this
module registers our policy losses and advantage estimators in verl (`rlhf_fast.integrations.verl.load_plugin`).
verl 0.9+ imports it on `import verl`; older verl with `VERL_USE_EXTERNAL_MODULES=rlhf_fast.integrations.verl_plugin`.
"""
from rlhf_fast.integrations import verl as _verl

_verl.load_plugin()
