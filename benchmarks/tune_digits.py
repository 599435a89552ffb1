"""Bayesian optimisation of the routing settings of the digits classifier with KerasTuner.

    PYTHONPATH=. KERAS_BACKEND=jax python benchmarks/tune_digits.py --trials 10 --epochs 8

Searches top_k, router type, temperature, training capacity factor and aux-loss weight
(`dl_moe.tuning.MoEHyperModel`) with score = val accuracy - flops_weight * expert
FLOPs per token / FLOPs of the first trial, then retrains nothing: it prints every
trial and the best one's test accuracy.
"""

import argparse
import tempfile

import keras
import keras_tuner

from dl_moe.tools.digits import build_classifier, load_digits_tokens
from dl_moe.tuning import MoEHyperModel


def build(overrides):
    model = build_classifier(hidden_dim=32, num_experts=8, num_blocks=1, **overrides)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main(trials=10, epochs=8, flops_weight=0.05, seed=0):
    keras.utils.set_random_seed(seed)
    x_train, x_test, y_train, y_test = load_digits_tokens(seed)
    split = int(0.8 * len(x_train))
    x_fit, y_fit, x_val, y_val = x_train[:split], y_train[:split], x_train[split:], y_train[split:]
    hypermodel = MoEHyperModel(build, top_k=(1, 2, 3), flops_weight=flops_weight)
    with tempfile.TemporaryDirectory() as directory:
        tuner = keras_tuner.BayesianOptimization(
            hypermodel, objective=keras_tuner.Objective("score", "max"), max_trials=trials, seed=seed,
            directory=directory, project_name="digits",
        )
        tuner.search(x_fit, y_fit, validation_data=(x_val, y_val), epochs=epochs, batch_size=64, verbose=0)
        rows = []
        for trial in tuner.oracle.get_best_trials(trials):
            values = trial.hyperparameters.values
            metric = lambda name: trial.metrics.get_last_value(name)  # noqa: E731
            rows.append((metric("score"), metric("val_accuracy"), metric("expert_flops_per_token"), values))
        print("score  val_acc  expert_kFLOPs/token  hyperparameters")
        for score, accuracy, flops, values in rows:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}
            print(f"{score:.4f}  {accuracy:.4f}  {flops / 1e3:8.1f}  {shown}")
        best = tuner.get_best_models(1)[0]
        _, test_accuracy = best.evaluate(x_test, y_test, verbose=0)
        print(f"best trial: test accuracy {test_accuracy:.4f}")
    return rows, test_accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--flops-weight", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.trials, args.epochs, args.flops_weight, args.seed)
