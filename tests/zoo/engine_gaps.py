"""Minimal reproducers of the engine gaps the zoo's xfails name; run it on any JAX:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/zoo/engine_gaps.py

Each line: the gap, then ``ok`` (autoshard equals one device) or the exception it raises."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import autoshard as ash  # noqa: E402

X = jnp.arange(32.0).reshape(8, 4) / 32

CASES = {
    # name: (function, its arguments, in_specs)
    "stack (jnp.stack)": (lambda x: jnp.stack([x, 2 * x], axis=1).sum(), (X,), (P("data"),)),
    "unstack (jnp.unstack)": (lambda x: sum(jnp.unstack(x, axis=1)).sum(), (X,), (P("data"),)),
    "iterating a traced array (binds unstack on 0.12)": (lambda x: sum(c for c in x.T).sum(), (X,), (P("data"),)),
    "typed PRNG key argument": (
        lambda x, k: jnp.where(jax.random.bernoulli(k, 0.9, x.shape), x, 0.0).sum(),
        (X, jax.random.key(0)), (P("data"), P())),
    "scan params (ft_in/ft_out on JAX >= 0.11)": (
        lambda c, xs: jax.lax.scan(lambda c, x: (c * x, c), c, xs)[0].sum(),
        (jnp.ones(4), X), (P(), P("data"))),
    "one_minus_square (tanh's derivative, 0.12)": (jax.grad(lambda x: jnp.tanh(x).sum()), (X,), (P("data"),)),
    "polynomial (erf's derivative, 0.12)": (jax.grad(lambda x: jax.lax.erf(x).sum()), (X,), (P("data"),)),
    "eval_jaxpr (vmap of a scan binds it on 0.12; behind the scan params gap)": (
        lambda xs: jax.vmap(lambda r: jax.lax.scan(lambda c, y: (c + y, c), 0.0, r)[0])(xs).sum(),
        (X,), (P("data"),)),
}


def check(fn, args, specs):
    mesh = ash.make_mesh("data=8")
    try:
        got = ash.parallelize(fn, mesh=mesh, in_specs=specs)(*args)
    except Exception as e:                       # noqa: BLE001 - the report names it
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    want = jax.jit(fn)(*args)
    ok = all(np.allclose(np.asarray(g), np.asarray(w), rtol=1e-5)
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return "ok" if ok else f"WRONG: {got} != {want}"


if __name__ == "__main__":
    print(f"jax {jax.__version__}")
    for name, (fn, args, specs) in CASES.items():
        print(f"{name}: {check(fn, args, specs)}")
