"""One-off migration (issue 11): give notebook 04's committed runs the complete run identity without retraining.

The runs under runs/{paper,quick}/04_fmnist_autoencoder/ were stored under the earlier identity (optimizer and
options, seed, epochs, batch size, n_train, model name and changed model options). For every run notebook 04
makes, this script executes the notebook's own settings and run cells with ``Experiment.run`` replaced, and

1. rebuilds the earlier identity from the notebook's settings and requires it to equal the stored one (config
   and digest): the settings the earlier identity covered are the ones the run was trained with;
2. builds the model as the run built it (seed, initialisation) and evaluates it on the data the notebook loads:
   the train and test MSE must equal the run's stored epoch-0 metrics, which pins what the earlier identity
   left out (the data and their preprocessing, n_test, the task, the initialisation);
3. only then stores the run under its new identity (``Experiment.identity``), recording the old digest and how
   it was migrated in ``result['identity_migration']``. Nothing is trained.

Run from the repository root: ``OMP_NUM_THREADS=1 .venv/bin/python tools/migrate_run_identity.py``.
A run that fails a check is left as it is and reported; the exit status is then 1.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "04_fmnist_autoencoder.ipynb"
sys.path.insert(0, str(REPO))
import companion as C  # noqa: E402
from companion import store as S  # noqa: E402
from companion import train as T  # noqa: E402
from companion.data import atomic_save  # noqa: E402


def earlier_identity(exp, optimizer, seed, options):
    """The identity before issue 11 (companion/train.py at commit 9418151), verbatim."""
    config = dict(notebook=exp.notebook, optimizer=optimizer, options=options, seed=seed, epochs=exp.epochs,
                  batch_size=exp.batch_size, n_train=len(exp.train_data[0]), model=exp.model_fn.__name__)
    changed = T.model_options_changed(exp.model_fn, exp.model_options)
    if changed:
        config["model_options"] = changed
    if exp.config:
        config["settings"] = exp.config
    if exp.overrides:
        config["overrides"] = exp.overrides
    return config


def earlier_digest(config):
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def migrate(profile, report):
    def run(exp, label, optimizer, seed, **options):
        path = exp.store.path(f"{T._slug(label)}-seed{seed}")
        stored = torch.load(path, weights_only=False)
        new = exp.identity(optimizer, seed, **options)
        if stored["config_digest"] == S.config_digest(new):
            report.append((profile, path.name, "already migrated"))
            return dict(stored, label=label, optimizer=optimizer, options=options, seed=seed)
        old = earlier_identity(exp, optimizer, seed, options)
        problems = []
        if stored["config"] != old or stored["config_digest"] != earlier_digest(old):
            problems.append(f"stored identity {stored['config']} is not the notebook's {old}")
        T.seed_everything(seed)
        model = exp.model_fn(**(exp.model_options or {}))
        epoch0 = stored["epochs"][0]
        fresh = {"train_loss": T.evaluate(model, exp.task, exp.train_data, torch.device("cpu"))["loss"],
                 "test_loss": T.evaluate(model, exp.task, exp.test_data, torch.device("cpu"))["loss"]}
        for key, value in fresh.items():
            if abs(value - epoch0[key]) > 1e-6 * abs(epoch0[key]):
                problems.append(f"epoch-0 {key} {epoch0[key]!r} is not the rebuilt model's {value!r}")
        if problems:
            report.append((profile, path.name, "NOT migrated: " + "; ".join(problems)))
        else:
            worst = max(abs(fresh[k] / epoch0[k] - 1) for k in fresh)
            stored.update(config=new, config_digest=S.config_digest(new), identity_migration=dict(
                from_digest=stored["config_digest"], tool="tools/migrate_run_identity.py",
                checks="earlier identity rebuilt from the notebook's settings; epoch-0 train/test MSE of the "
                       f"rebuilt model on the loaded data equal the stored ones (largest relative gap {worst:.1e})"))
            atomic_save(stored, path)
            report.append((profile, path.name, f"migrated (epoch-0 MSE relative gap {worst:.1e})"))
        return dict(stored, label=label, optimizer=optimizer, options=options, seed=seed)

    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"
             and not {"parameters", "injected-parameters"} & set(c["metadata"].get("tags", []))]
    sources = ["".join(c["source"]) for c in cells]
    last_run = max(i for i, s in enumerate(sources) if ".run(" in s)
    wanted = sources[:last_run + 1]  # settings, data, runs, table, initialisation check
    T.Experiment.run = run
    C.report.write_table = C.report.save_figure = lambda *a, **k: None  # figures/ stays untouched
    namespace = {"profile": profile, "overrides": {}, "display": lambda *a, **k: None}
    os.chdir(NOTEBOOK.parent)
    for source in wanted:
        exec(compile(source, str(NOTEBOOK), "exec"), namespace)
    return {p.name for p in (REPO / "runs" / profile / NOTEBOOK.stem).glob("*.pt")}


if __name__ == "__main__":
    torch.set_num_threads(1)
    report, files = [], {}
    for profile in ("paper", "quick"):
        files[profile] = migrate(profile, report)
    for row in report:
        print(*row, sep="  ")
    seen = {(p, n) for p, n, _ in report}
    left = [(p, n) for p in files for n in files[p] if (p, n) not in seen]
    print(f"{len(report)} runs checked; files the notebook does not make: {left or 'none'}")
    sys.exit(1 if left or any("NOT" in r[2] for r in report) else 0)
