"""The human feedback app: annotators rank, rate, compare, correct, demonstrate and critique sampled responses.

Layers: `app.py` (thin FastAPI routes) -> `service.py` (domain functions) -> `store.py` (SQLAlchemy models).
It never imports torch or a stage: it reads `rlhf sample` JSONL and writes the records of `rlhf.data.records`.
"""
