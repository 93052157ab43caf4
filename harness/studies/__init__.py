"""Optuna studies: the same tuning budget for every method, then seeded reproductions.

A study spec is a YAML file (``studies/*.yaml``). Every method entry is tuned with the same
budget (trials x epochs, optional wall-clock cap) on the validation split, then its best
configuration is retrained with several seeds and evaluated on the test split. Results live in
MLflow only; :mod:`harness.reports.build` rebuilds tables and figures from there.

Spec format (every key is checked; a typo names the closest valid key)::

    name: demo                       # study name: Optuna study names, MLflow tag dmlbench.study
    description: free text
    backbone: tf_efficientnet_lite0  # timm name; an entry may override it
    datasets: [fashion_mnist]        # dataset names (datasets/*.yaml)
    methods: all                     # 'all' = every registered method whose families include the
                                     # backbone's family, or a list of names / entries:
      # - full_finetune
      # - method: frpt               # registry name (required)
      #   name: frpt_r101            # unique id in the study (default: the method name)
      #   label: "FRPT R101"         # row label in reports (default: the name)
      #   backbone: resnet101        # per-entry backbone
      #   preset: paper              # a preset of the method (harness.models.registry presets)
      #   overrides: {data.shots: 5} # run-config keys for this entry only
      #   search_space:              # merged over the registry's space; `key: null` drops a key
      #     optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      #   fixed: true                # no tuning: only the seeded reproductions of this config
      #   published_as: pretrained   # method name in harness/reports/published.yaml (default: method)
    exclude: [frpt_bbox]             # with 'all': registry names to leave out
    references:                      # untuned rows appended after the methods (fixed: true),
      - {method: linear_probe, name: pretrained, label: "pretrained (no training)",
         published_as: pretrained, overrides: {optim.epochs: 0, model.embed_dim: 0}}
    overrides: {data.max_per_class: 40}  # run-config keys applied to every run
    objective: val_map_at_r          # val_map_at_r | val_recall_at_1 (maximised; sets eval.select)
    budget: {n_trials: 2, epochs: 2, timeout_s: 600}  # per tuned entry and dataset, the same for
                                     # all; timeout_s: a worker starts no new trial of an entry
                                     # after that many seconds on it (per invocation)
    sampler: {name: tpe, seed: 0, n_startup_trials: 5}  # tpe | random | bruteforce | grid
    pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
                                     # median | hyperband | threshold (lower/upper) | none
    reproduce: {seeds: [0, 1, 2]}    # seeds of the test runs of each entry's best config ([] = none)
    protocol: fair                   # fair | paper: how reproductions select and report (trials always
                                     # select on validation classes; paper = all training classes, best
                                     # test epoch, the only rows reports compare with published numbers)
    storage: ""                      # Optuna storage: SQLAlchemy URL (several machines) or journal
                                     # file path; '' = <dir of mlflow.db>/<name>.optuna.journal;
                                     # --storage wins

Checkpoints are selected on the objective's validation metric (``eval.select`` follows it), and
with ``--workers N`` each of the N spawned processes uses cpu_count / N torch threads.

Fairness: ``budget.epochs`` sets ``optim.epochs`` for every tuned entry, so neither ``overrides``
may set it (a fixed entry may, e.g. 0 epochs for the untrained backbone).

Workers and resume: one Optuna study per (study, dataset, entry), named
``<study>/<dataset>/<entry>``. Workers ask/tell against the shared storage, so N processes (here
or on other machines with an SQL storage URL) share one budget, and re-running the command only
runs the missing trials. Optuna's own heartbeat exists only for RDBStorage inside
``study.optimize``; the exact shared budget needs ask/tell, so each running trial records its
host, pid and a heartbeat in its user attributes. A RUNNING trial whose process is gone (same
host) or whose heartbeat is older than :data:`STALE_AFTER_S` is failed and its parameters are
enqueued again.

MLflow: one parent run per (study, dataset, entry), found again by tags on resume; each trial and
each reproduction is a nested child run tagged ``dmlbench.study``, ``dmlbench.entry``,
``dmlbench.role`` (trial | reproduction), ``dmlbench.trial`` / ``dmlbench.seed``.
"""
