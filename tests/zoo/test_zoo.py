"""Issue #14 part 7: third-party models (tiny configs, random init) under dp, fsdp and
Megatron tp path-pattern rules equal one device on value_and_grad and one adamw step.

Every library is imported at collection: a missing one is an error, never a skip. Cases
that fail on an engine gap are ``xfail(strict=True)`` with the gap named (harness.XFail in
each library module), so the list shrinks, loudly, as the engine is fixed."""
import pytest

from harness import cases, run_case


@pytest.mark.parametrize("name,strategy", cases())
def test_zoo_model_equals_one_device(name, strategy):
    run_case(name, strategy)
