curl 'http://127.0.0.1:8000/poll?cursor=0&timeout=1'     # a second later: nothing new
curl 'http://127.0.0.1:8000/poll?cursor=abc'
curl 'http://127.0.0.1:8000/poll?cursor=7'               # a cursor from another room
