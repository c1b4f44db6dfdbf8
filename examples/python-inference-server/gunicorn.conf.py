# gunicorn -c gunicorn.conf.py app:app
import os

bind = os.environ.get("DEMO_BIND", "127.0.0.1:8090")
workers = int(os.environ.get("DEMO_WORKERS", "4"))
threads = 4
worker_class = "gthread"
preload_app = True  # the shared simulated device is created once, in the master
timeout = 60
loglevel = "warning"
