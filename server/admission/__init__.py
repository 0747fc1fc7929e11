"""Admission: who may talk to the coordinator, and as whom. Security is enforced here.

Every check that decides whether a peer is let in, and under which identity its updates are
booked, lives in this package and nowhere else in the coordinator:

    exposure.py    the loopback rule: a non-loopback address needs TLS or --insecure
                   (checked with the configuration), and plaintext off loopback is logged
    tls.py         the port's TLS and mutual TLS credentials (gRPC and the status page),
                   and the identity a verified client certificate carries
    identity.py    who a joining client is: certificate common name, --tokens file, or
                   its claim (first come, first served)
    sessions.py    the sessions held: one live session per identity, each call's session
                   token, which clients are live
    door.py        `Admission`: a Join's checks in order (fields, identity, task and model
                   layout, the one-live-session rule, --max-clients), and the session a
                   call's token names

The servicer (`server/servicer.py`) is the only caller on the network's side: it hands
admission each call's credentials (peer certificate, bearer token) and gets back the
client record, or a domain error that it maps to a gRPC status. The token file's format
is `fedstream.common.tokens`; the client's TLS set-up is `fedstream.common.tls`.
This package imports nothing at its top, so importing one of its modules pulls in no other.
"""
