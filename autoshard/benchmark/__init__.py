"""``autoshard bench``: autoshard against XLA's own propagation and the analytic optimum.

One row per (model, mesh, strategy). Both programs get the same annotations: the preset's
parameter and batch specs. autoshard receives them as ``in_specs``; the baseline is
``jax.jit`` with them as ``NamedSharding`` ``in_shardings`` (XLA/Shardy propagation decides
everything else). The optimizer state is not annotated by the presets; both programs get the
layout autoshard infers for it, which is its parameter's layout (what a user of ``jax.jit``
writes by hand), so they start from the same per-device state.

Measured per program, from the compiled executable (never from wall time alone):

* ``wire``: bytes each device sends per step, summed over the collectives parsed from the
  compiled HLO (``report/hlo.py``) with the ring formulas of ``compiler/cost_model.py``;
* collective counts by kind;
* per-device memory from ``memory_analysis()``: arguments + outputs + temporaries - aliased;
* per-device flops from ``cost_analysis()``;
* autoshard's pass time (trace to lowered StableHLO), XLA's compile time, and the median step
  time over a few steps (noise on the shared-core CPU machine; a ratio at best).

The analytic minimum (``min``) is the fewest bytes per device and step that the strategy
itself requires, in the same ring model. With ``N`` the bytes of all parameters, ``s`` a
scalar's 4 bytes, ``n_d`` / ``n_m`` the sizes of the ``data`` / ``model`` axes, ``A`` the
bytes of one layer's activation ``[B/n_d, T, D]`` (``[B/n_d, D]`` for the MLP) and ``L``
layers:

* ``dp``:     ``2 (n_d-1)/n_d (N + s)``: one all-reduce of every gradient and of the loss;
* ``fsdp``:   ``2 (n_d-1)/n_d N + 2 (n_m-1)/n_m N/n_d + 2 (n_d n_m-1)/(n_d n_m) s``:
  all-gather every parameter once ((n_d-1)/n_d N, kept for the backward pass inside one step)
  and reduce-scatter its gradient ((n_d-1)/n_d N); parameters with no divisible dim are
  all-reduced (the same 2 (n_d-1)/n_d). On a ``data x model`` mesh ``model`` is idle (no
  annotation names it): the batch is split over it too (HSDP, ``passes/idle_axes.py``), so
  each device's gradient shard ``N/n_d`` is all-reduced over ``model`` and the loss over both
  axes; with no ``model`` axis (``n_m = 1``) this is ``2 (n_d-1)/n_d (N + s)``;
* ``tp``:     ``2 (n_m-1)/n_m R A``: Megatron all-reduces ``R`` activations (the batch is not
  split, ``n_d`` is idle): GPT ``R = 4 L``, after attention and after the MLP and their input
  gradients; the MLP ``R = 2 L - 1``, as the first block's input gradient is not needed.
  Replicated parameters see whole activations, so their gradients need nothing;
* ``dp_tp``:  the tp term over ``model`` plus ``2 (n_d-1)/n_d (N_rep + N_split/n_m + s)`` over
  ``data``: gradients of replicated and of model-split parameters, and the loss;
* ``sp``:     as dp_tp, plus ``2 (n_m-1)/n_m N_seq`` for the gradients of the replicated
  parameters that see sequence shards (layernorms, embeddings, head, row-parallel biases), and
  the loss reduced over both axes; the tp term is the same bytes moved as all-gathers and
  reduce-scatters instead of all-reduces.

* ``pp``:     the scanned GPT (``PIPELINE_LAYERS`` = 4 layers) pipelined over ``stage`` (``S``
  stages, ``M`` = S microbatches; mesh ``data=2,stage=4``), ``A`` as above:
  ``2 (M+S-1) A/M``: each of the ``M+S-1`` ticks of the forward and of the backward tick loop
  sends one microbatch's activation ``A/M`` to the next stage (one collective-permute);
  ``+ 2 * 2 (S-1)/S A``: the last stage's output reaches the (replicated, stage-wise) head on
  every stage, and the input gradient the embedding, each a broadcast at the ring's
  bandwidth-optimal cost (scatter + all-gather, the all-reduce's bytes);
  ``+ 2 (n_d-1)/n_d (N_rest + N_blocks/S + s)``: one data-parallel all-reduce of this
  device's gradients (its stage's slice of the stacked layers, every unstacked parameter) and
  the loss. autoshard all-reduces each layer's gradient over ``data`` inside the backward
  tick loop (once per tick, not once per step), so it sits above this minimum; the check
  asserts the activation permutes alone equal ``2 (M+S-1) A/M``. The row's wire bytes are the
  report's per step with loop trips (the HLO count takes a loop body once); its flops are
  XLA's ``cost_analysis()`` and memory ``memory_analysis()``. ``jax.jit`` has no pipeline: the
  row has no jit baseline (``Row.jit`` is None, ``-`` in the table).

These are the bytes of the strategy as written (ZeRO-3 for fsdp). autoshard may go below them
where moving activations is cheaper than moving weights (the MLP under fsdp all-to-alls its
small activations instead of gathering its kernels); it must never go above them for GPT.
Models other than GPT and the MLP (MoE, CNN) get the dp / fsdp minimum only; their other rows
print ``-``. Collectives inside loops are counted once per instruction, so the benchmark uses
unrolled layers (except ``pp``, whose layer loop is the pipeline: see above).
"""
__all__ = ["BENCH_BATCH", "BENCH_CONFIGS", "MESHES", "NOTES", "SCALING_LAYERS", "Check", "Measured", "Row",
           "PIPELINE_LAYERS", "ScalingPoint", "analytic_min_bytes", "pipeline_min_bytes", "auto_checks", "auto_rows", "checks", "linear_fit", "measure",
           "mesh_axes", "ratio_text", "rows_to_measure", "run", "scaling_point", "single_device_row", "CSV_FIELDS",
           "YARDSTICKS", "yardstick_checks",
           "auto_markdown", "machine_line", "markdown_table", "results_markdown", "row_record", "write_csv"]

from .measure import (BENCH_BATCH, BENCH_CONFIGS, MESHES, NOTES, PIPELINE_LAYERS, SCALING_LAYERS, Check,
                      Measured, Row, ScalingPoint, analytic_min_bytes, pipeline_min_bytes, auto_checks, auto_rows, checks, linear_fit, measure,
                      mesh_axes, ratio_text, rows_to_measure, run, scaling_point, single_device_row,
                      YARDSTICKS, yardstick_checks)
from .tables import CSV_FIELDS, auto_markdown, machine_line, markdown_table, results_markdown, row_record, write_csv
