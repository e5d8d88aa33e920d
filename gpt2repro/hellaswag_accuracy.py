"""HellaSwag accuracy as an `evaluate` metric, loaded by path so it works offline.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub; this module ships with gpt2repro
instead, and gpt2repro/hellaswag.py loads it with `evaluate.load(<path of this file>)`.

Each example contributes two predicted ending indices (0-3): the ending with the lowest total loss (`acc`)
and the one with the lowest length-normalised loss (`acc_norm`), against the labelled ending.
"""
import datasets
import evaluate

_DESCRIPTION = """\
HellaSwag accuracy: the fraction of examples whose chosen ending is the labelled one, once for the ending
chosen by total loss (acc) and once for the ending chosen by length-normalised loss (acc_norm).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): per example, the ending (0-3) with the lowest total loss.
    predictions_norm (`list` of `int`): per example, the ending (0-3) with the lowest normalised loss.
    references (`list` of `int`): per example, the correct ending (0-3).
Returns:
    acc (`float`), acc_norm (`float`): accuracies in [0, 1];
    correct (`int`), correct_norm (`int`): how many examples each choice got right;
    count (`int`): how many examples were scored.
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("hellaswag_accuracy.py")
    >>> metric.compute(predictions=[0, 1], predictions_norm=[0, 2], references=[0, 2])
    {'acc': 0.5, 'acc_norm': 1.0, 'correct': 1, 'correct_norm': 2, 'count': 2}
"""

_CITATION = """\
@inproceedings{zellers2019hellaswag,
    title={HellaSwag: Can a Machine Really Finish Your Sentence?},
    author={Zellers, Rowan and Holtzman, Ari and Bisk, Yonatan and Farhadi, Ali and Choi, Yejin},
    booktitle={Proceedings of the 57th Annual Meeting of the Association for Computational Linguistics},
    year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HellaswagAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "predictions_norm": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions: list[int], predictions_norm: list[int], references: list[int]) -> dict:
        count = len(references)
        if count == 0:
            raise ValueError("HellaSwag accuracy needs at least one scored example.")
        correct = sum(int(p == r) for p, r in zip(predictions, references, strict=True))
        correct_norm = sum(int(p == r) for p, r in zip(predictions_norm, references, strict=True))
        return {
            "acc": correct / count,
            "acc_norm": correct_norm / count,
            "correct": correct,
            "correct_norm": correct_norm,
            "count": count,
        }
