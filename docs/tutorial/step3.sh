curl --data 'name=ann&message=' http://127.0.0.1:8000/send
head -c 40000 /dev/zero | curl --data-binary @- http://127.0.0.1:8000/send
