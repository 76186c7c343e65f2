gunicorn -k asyncapp.gunicorn.Worker -w 1 -b 127.0.0.1:8000 chat:app
