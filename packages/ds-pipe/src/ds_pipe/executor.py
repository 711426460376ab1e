"""Runs a schedule's instructions for one batch on this stage (see ``schedule.py``).

Each instruction has a normal form and a drain form. When an instruction fails on this rank — the
data iterator runs out, a layer rejects its input, shapes change — the error is kept and the rest
of the batch runs in drain form: no compute, but every send and receive still happens (zeros or an
error marker, see ``p2p.py``), so neighbours never wait forever. The engine then agrees on failure
with one collective and every rank raises the first rank's error.
"""

from __future__ import annotations

import traceback

import torch

from ds_core.errors import DSError

from . import schedule as S
from .p2p import _as_tuple

__all__ = ["BatchState", "PipeDataError", "run_instructions"]


class PipeDataError(DSError, RuntimeError):
    """The data iterator cannot supply a full batch of micro-batches."""


class _PeerFailed(Exception):
    """A neighbouring stage failed (it sent an error marker instead of activations)."""


class BatchState:
    def __init__(self, mode: str, micro_batches: int) -> None:
        self.mode, self.micro_batches = mode, micro_batches
        self.inputs: dict[int, tuple | None] = {}
        self.labels: dict[int, object] = {}
        self.outputs: dict[int, object] = {}
        self.grads: dict[int, list | None] = {}
        self.losses: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.error: str | None = None
        self.exception: BaseException | None = None
        self.drain = False


def _load(engine, st: BatchState, i: int, data_iter) -> None:
    if data_iter is None:
        raise PipeDataError(f"stage {engine.stage_id} needs data (it is the first or last stage) but "
                            f"data_iter is None; pass the same kind of iterator on every rank")
    try:
        batch = next(data_iter)
    except StopIteration:
        raise PipeDataError(
            f"the data iterator ran out at micro-batch {i} of {st.micro_batches} "
            f"(one batch takes gradient_accumulation_steps = {st.micro_batches} items); give train_batch "
            f"a longer or repeating iterator (e.g. itertools.cycle)") from None
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise PipeDataError(f"each item of data_iter must be (inputs, labels), got {type(batch).__name__}"
                            f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}")
    inputs, labels = batch
    if engine.is_first_stage():
        st.inputs[i] = tuple(engine.core.cast_inputs(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
    if engine.is_last_stage():
        st.labels[i] = engine.core.cast_inputs(labels)


def _forward(engine, st: BatchState, i: int) -> None:
    inputs = st.inputs[i]
    try:
        out = engine.module(*inputs)
    except Exception as exc:
        if engine.is_first_stage():
            raise
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise DSError(f"stage {engine.stage_id} (layers {engine.module.local_start}-"
                      f"{engine.module.local_stop - 1}) failed on micro-batch {i} with inputs of shapes "
                      f"[{shapes}] received from stage {engine.stage_id - 1}: {exc}; the output of the last "
                      f"layer of stage {engine.stage_id - 1} must be what the first layer of stage "
                      f"{engine.stage_id} takes") from exc
    if not engine.is_last_stage():
        st.outputs[i] = out
        return
    if st.mode == "eval":
        st.logits.append(out.detach() if isinstance(out, torch.Tensor) else out)
    loss_fn = engine.module.loss_fn
    loss = loss_fn(out, st.labels.pop(i)) if loss_fn is not None else out
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise DSError(f"the last stage must produce a scalar loss, got {type(loss).__name__}"
                      f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}; pass loss_fn= to "
                      f"PipelineModule or make the last layer return the loss")
    st.losses.append(loss.detach().float())
    st.outputs[i] = loss


def _backward(engine, st: BatchState, i: int) -> None:
    """One micro-batch's backward through the stage engine, accumulating only (the batch's gradients
    are averaged once, after every stage agreed the batch succeeded: ``ReduceGrads``)."""
    core = engine.core
    out = st.outputs.pop(i)
    if engine.is_last_stage():
        core.backward(out, sync=False)  # scaled by 1/micro-batches (and the fp16 loss scale) there
    else:
        pairs = [(o, g) for o, g in zip(_as_tuple(out), st.grads.pop(i)) if g is not None and o.requires_grad]
        if pairs:
            core.backward(tuple(o for o, _ in pairs), grad_tensors=tuple(g for _, g in pairs), sync=False)


def _run(engine, st: BatchState, cmd, data_iter) -> None:
    link, i = engine.link, cmd.micro_batch
    if isinstance(cmd, S.LoadMicroBatch):
        _load(engine, st, i, data_iter)
    elif isinstance(cmd, S.RecvActivation):
        st.inputs[i] = link.recv_activations(st.mode, engine.core.device)
        if st.inputs[i] is None:
            raise _PeerFailed
    elif isinstance(cmd, S.ForwardPass):
        _forward(engine, st, i)
    elif isinstance(cmd, S.SendActivation):
        link.send_activations(st.outputs[i], st.mode, i, drain=False)
        if st.mode == "eval":
            del st.outputs[i]
    elif isinstance(cmd, S.RecvGrad):
        st.grads[i] = link.recv_grads(engine.core.device)
        if st.grads[i] is None:
            raise _PeerFailed
    elif isinstance(cmd, S.BackwardPass):
        _backward(engine, st, i)
    elif isinstance(cmd, S.SendGrad):
        link.send_grads(st.inputs.pop(i), drain=False)
    else:
        raise DSError(f"instruction {cmd!r} is not executable per micro-batch")


def _drain(engine, st: BatchState, cmd) -> None:
    link, i = engine.link, cmd.micro_batch
    if isinstance(cmd, S.RecvActivation):
        st.inputs[i] = link.recv_activations(st.mode, engine.core.device)
    elif isinstance(cmd, S.SendActivation):
        link.send_activations(None, st.mode, i, drain=True)
    elif isinstance(cmd, S.RecvGrad):
        link.recv_grads(engine.core.device)
    elif isinstance(cmd, S.SendGrad):
        link.send_grads(None, drain=True)


def run_instructions(engine, st: BatchState, instructions, data_iter) -> None:
    """Execute the per-micro-batch instructions, switching to drain form after a failure."""
    grad = torch.enable_grad() if st.mode == "train" else torch.no_grad()
    with grad:
        for cmd in instructions:
            if st.drain:
                _drain(engine, st, cmd)
                continue
            try:
                _run(engine, st, cmd, data_iter)
            except _PeerFailed:
                st.drain = True
            except Exception as exc:  # noqa: BLE001 - every failure must keep the links in step
                st.error = f"{type(exc).__name__}: {exc}"
                st.exception = exc
                st.trace = traceback.format_exc()
                st.drain = True
                _drain(engine, st, cmd)
    engine.link.wait_sends()
