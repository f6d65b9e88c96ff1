"""Tasks: a model architecture with its data, loss and metric (see :mod:`.protocol`).

Built-ins: ``lenet5`` (Caffe LeNet-5 on MNIST-format IDX files, default Fashion-MNIST),
``lm`` (a Hugging Face causal language model on a text file, perplexity as the metric) and
``mlp-digits`` (a small MLP on scikit-learn's digits). Users bring their own with
``--task package.module:factory``.
"""

from mlcompress.tasks.evaluation import Evaluation, evaluate_model, evaluate_outputs
from mlcompress.tasks.protocol import Task, TensorTask, accuracy, higher_is_better, summarized_metric
from mlcompress.tasks.registry import get_task, task_names
from mlcompress.tasks.training import TrainResult, train_task_model
from mlcompress.tasks.weights import check_state_dict_fits, load_task_model

__all__ = [
    "Evaluation",
    "Task",
    "TensorTask",
    "TrainResult",
    "accuracy",
    "check_state_dict_fits",
    "evaluate_model",
    "evaluate_outputs",
    "get_task",
    "higher_is_better",
    "load_task_model",
    "summarized_metric",
    "task_names",
    "train_task_model",
]
