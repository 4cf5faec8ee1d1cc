"""Who may call which RPC between the cluster's services.

Every service-to-service call carries an identity: a client certificate whose common name is the
caller's role (mutual TLS, the production mode) or a short-lived service token signed with the
cluster's shared secret (the mode without TLS). One table (`roles.AUTHORIZATION`) says which roles
may call which RPC of which service; the server kit enforces it before any handler runs.
"""
