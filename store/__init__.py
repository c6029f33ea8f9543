"""The model store: where runs and models live, between the core (`cxrcf`) and the outer rooms.

- `store.tracking`: the MLflow tracking URI, experiments, and the run-logging helpers every phase uses;
- `store.models`: model references (`NAME@ALIAS`, `NAME/VERSION`), aliases, version metrics, and
  loading a GeneratorBundle from any model URI or directory;
- `store.runs`: `run.json`, the run id written beside every exported model.

It imports only the core; training, serving and pipelines import it (never the other way round).
"""
