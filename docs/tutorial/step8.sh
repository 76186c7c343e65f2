redis-server --port 6379 --save '' --appendonly no --daemonize yes
REDIS_URL=redis://127.0.0.1:6379/0 gunicorn -k asyncapp.gunicorn.Worker -w 4 -b 127.0.0.1:8000 chat:app
