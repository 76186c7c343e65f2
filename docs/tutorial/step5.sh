curl http://127.0.0.1:8000/nowhere
curl http://127.0.0.1:8000/send
