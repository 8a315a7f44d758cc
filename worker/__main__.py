from .main import run_worker

run_worker()
