"""Evaluating and running a trained twin with MONAI's engines: forecasts and what-if forecasts.

MONAI's :class:`~monai.engines.SupervisedEvaluator` calls ``inferer(inputs, network)`` and keeps
one prediction. A twin's ``forecast`` method also predicts the future EHR values, and a what-if
run needs the same patient forecast under two sets of conditions. :class:`ForecastEvaluator` and
:class:`WhatIfEvaluator` add exactly that and otherwise behave as a ``SupervisedEvaluator``: metric
handlers on ``pred``/``label`` (``from_engine(["pred", "label"])``), stats and checkpoint handlers,
and :class:`~monai_twin.handlers.ForecastWriter` to write the outputs of a bundle's inference run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from .prepare_batch import FORECAST_CONDITION_KEYS, ForecastPrepareBatch

__all__ = ["ForecastEvaluator", "WhatIfEvaluator"]


class ForecastEvaluator(SupervisedEvaluator):
    """A :class:`~monai.engines.SupervisedEvaluator` for twins: the forecast scan and the future EHR values.

    Each iteration runs ``network.forecast(history, **conditions)`` when the network has a
    ``forecast`` method (``(image, future_ehr)``), otherwise ``inferer(history, network, **conditions)``,
    in the evaluator's ``mode`` (``"eval"``: ``network.eval()`` under ``torch.no_grad()``). The
    output dictionary holds:

    - ``image``: the history ``(B, T, C, *spatial)`` as prepared;
    - ``label``: the target scan ``(B, C, *spatial)``, ``None`` when the batch has none;
    - ``pred``: the forecast ``(B, C, *spatial)``, clamped to ``clamp``; a :class:`~monai.data.MetaTensor`
      carrying the history's metadata (affine of the reference visit -- the last prior scan) when
      the history is one, so a writer saves it in the reference visit's space;
    - ``pred_ehr``: the future EHR values ``(B, K)`` in the normalised scale of
      :class:`~monai_twin.transforms.ehr.EHRFutureValues` (``K = 0`` without a ``forecast`` method).

    ``decollate`` defaults to ``False`` (MONAI's default is ``True``): the outputs stay batched,
    which the metric handlers (``from_engine(["pred", "label"])``) and
    :class:`~monai_twin.handlers.ForecastWriter` read directly.

    Args:
        args, kwargs: as :class:`~monai.engines.SupervisedEvaluator` (``device``, ``val_data_loader``,
            ``network``, ``key_val_metric``, ``val_handlers``, ...). ``prepare_batch`` defaults to
            :class:`~monai_twin.engines.ForecastPrepareBatch` (the target is optional);
            ``iteration_update`` is taken.
        clamp: clip the forecast to this intensity range, e.g. ``(0.0, 1.0)`` for the synthetic
            cohorts (``None``: leave it).

    Raises:
        ValueError: ``iteration_update`` given, or ``clamp`` not ``(low, high)`` with ``low < high``.

    Example::

        evaluator = ForecastEvaluator(
            device="cpu",
            val_data_loader=DataLoader(dataset, batch_size=4, collate_fn=collate_longitudinal),
            network=twin,
            key_val_metric={"val_mse": MeanSquaredError(output_transform=from_engine(["pred", "label"]))},
            val_handlers=[ForecastWriter("outputs")],
        )
        evaluator.run()
    """

    def __init__(self, *args: Any, clamp: Sequence[float] | None = (0.0, 1.0), **kwargs: Any) -> None:
        if kwargs.get("iteration_update") is not None:
            raise ValueError(f"{type(self).__name__} runs its own iteration; do not pass iteration_update.")
        if clamp is not None and (len(clamp) != 2 or not float(clamp[0]) < float(clamp[1])):
            raise ValueError(f"clamp must be (low, high) with low < high, or None; got {clamp!r}.")
        if kwargs.get("prepare_batch") is None:
            kwargs["prepare_batch"] = ForecastPrepareBatch()
        kwargs.setdefault("decollate", False)
        kwargs["iteration_update"] = self._forecast_iteration
        super().__init__(*args, **kwargs)
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))

    def _run_network(self, inputs: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (N, C, *spatial), future_ehr (N, K))`` for a batch of ``N``, clamped, as plain tensors."""
        # the network sees plain tensors: the metadata is the history's and is put back on `pred`
        inputs = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        kwargs = {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in kwargs.items()}
        with self.mode(self.network):
            with torch.autocast("cuda", **self.amp_kwargs) if self.amp else contextlib.nullcontext():
                if hasattr(self.network, "forecast"):
                    image, future = self.network.forecast(inputs, *args, **kwargs)
                else:
                    image = self.inferer(inputs, self.network, *args, **kwargs)
                    future = torch.zeros(image.shape[0], 0, dtype=image.dtype, device=image.device)
        image = image.as_tensor() if isinstance(image, MetaTensor) else image
        if self.clamp is not None:
            image = image.clamp(*self.clamp)
        return image, future

    def _forecast_iteration(self, engine: ForecastEvaluator, batchdata: Mapping[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets, args, kwargs = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        engine.state.output = output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        output.update(self._predict(engine, batchdata, inputs, args, kwargs))
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output

    def _predict(
        self, engine: ForecastEvaluator, batchdata: Mapping[str, Any], inputs: torch.Tensor, args: tuple, kwargs: dict
    ) -> dict[str, torch.Tensor]:
        image, future = self._run_network(inputs, args, kwargs)
        return {Keys.PRED: _with_meta_of(image, inputs), "pred_ehr": future}


class WhatIfEvaluator(ForecastEvaluator):
    """A :class:`ForecastEvaluator` forecasting every sample twice: as recorded/planned and with an edit.

    The counterfactual conditions are the batch's keys with ``suffix`` (``ehr_intervals_whatif``,
    ``ehr_intervals_mask_whatif``, ...; an absent suffixed key means "same as the baseline"). Both
    sets go through the network in one concatenated batch of ``2B``, so the two forecasts see the
    same computation and their difference shows the effect of the edit alone. The output holds,
    beside ``image`` and ``label``:

    - ``pred``: the baseline forecast ``(B, C, *spatial)`` (metric handlers score it);
    - ``pred_whatif``: the counterfactual forecast ``(B, C, *spatial)``;
    - ``difference``: ``pred_whatif - pred`` (after clamping);
    - ``pred_ehr``, ``pred_ehr_whatif``: the future EHR values ``(B, K)`` under each.

    The three images carry the history's metadata (see :class:`ForecastEvaluator`).

    Args:
        args, kwargs: as :class:`ForecastEvaluator`.
        suffix: the suffix of the counterfactual keys.

    Raises:
        KeyError: (at run time) a batch has none of the counterfactual keys -- nothing was edited.
        ValueError: (at run time) a counterfactual tensor's shape differs from its baseline's.

    Example::

        # each item also holds the edited encodings, e.g. ehr_intervals_whatif / ehr_intervals_mask_whatif
        evaluator = WhatIfEvaluator(device="cpu", val_data_loader=loader, network=twin,
                                    val_handlers=[ForecastWriter("outputs/half_dose")])
        evaluator.run()
    """

    def __init__(self, *args: Any, suffix: str = "_whatif", **kwargs: Any) -> None:
        if not suffix:
            raise ValueError("suffix must be a non-empty string (the counterfactual keys are '<key><suffix>').")
        super().__init__(*args, **kwargs)
        self.suffix = suffix

    def _counterfactual_keys(self) -> tuple[str, ...]:
        """The suffixed keys that change what the network sees."""
        prepare = self.prepare_batch
        if isinstance(prepare, ForecastPrepareBatch):
            return tuple(f"{k}{self.suffix}" for k in (prepare.image_key, *prepare.condition_keys))
        return tuple(f"{k}{self.suffix}" for k in ("history", *FORECAST_CONDITION_KEYS))

    def _predict(
        self, engine: ForecastEvaluator, batchdata: Mapping[str, Any], inputs: torch.Tensor, args: tuple, kwargs: dict
    ) -> dict[str, torch.Tensor]:
        expected = self._counterfactual_keys()
        if not any(k in batchdata for k in expected):
            raise KeyError(
                f"WhatIfEvaluator: the batch has no counterfactual input -- none of {list(expected)} -- so nothing "
                f"was edited (batch keys: {sorted(map(str, batchdata))}). Encode the edited events under the "
                f"baseline keys with the suffix {self.suffix!r}."
            )
        n = len(self.suffix)
        edited = dict(batchdata)
        edited.update({k[:-n]: v for k, v in batchdata.items() if isinstance(k, str) and k.endswith(self.suffix)})
        inputs_cf, _, args_cf, kwargs_cf = engine.prepare_batch(
            edited, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        if set(kwargs_cf) != set(kwargs):
            raise KeyError(
                f"WhatIfEvaluator: the baseline conditions are {sorted(kwargs)}, the counterfactual ones "
                f"{sorted(kwargs_cf)}; give a '{self.suffix}' key only for a key the baseline has."
            )
        image_key = getattr(engine.prepare_batch, "image_key", "history")
        for key, base, cf in [(image_key, inputs, inputs_cf), *((k, kwargs[k], kwargs_cf[k]) for k in kwargs)]:
            if base.shape != cf.shape:
                raise ValueError(
                    f"WhatIfEvaluator: batch[{key + self.suffix!r}] has shape {tuple(cf.shape)}, expected the "
                    f"baseline's {tuple(base.shape)}."
                )
        b = inputs.shape[0]
        both = torch.cat([_plain(inputs), _plain(inputs_cf)])
        conditions = {k: torch.cat([_plain(kwargs[k]), _plain(kwargs_cf[k])]) for k in kwargs}
        image, future = self._run_network(both, args, conditions)
        pred, pred_whatif = image[:b], image[b:]
        return {
            Keys.PRED: _with_meta_of(pred, inputs),
            "pred_whatif": _with_meta_of(pred_whatif, inputs),
            "difference": _with_meta_of(pred_whatif - pred, inputs),
            "pred_ehr": future[:b],
            "pred_ehr_whatif": future[b:],
        }


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _with_meta_of(image: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """``image`` as a MetaTensor with the history's metadata (the reference visit's affine), when it has some."""
    if not isinstance(history, MetaTensor):
        return image
    out = MetaTensor(image)
    out.copy_meta_from(history, copy_attr=True)
    # the history's transform trace describes (T, C, *spatial) stacks: it cannot invert a forecast
    out.applied_operations = [[] for _ in range(image.shape[0])] if history.is_batch else []
    return out
