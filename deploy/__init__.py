"""Tools to run the app as a real Flower deployment: SuperLink and SuperNodes on separate hosts.

Simulation runs every client inside one SuperLink process; a deployment runs one long-lived
SuperNode per client machine, talking to the SuperLink over TLS, each authenticated by its own
ECDSA key. These modules make the pieces a deployment needs and the exact commands that start it:

- ``deploy.certs``: a CA, the SuperLink's TLS certificate (with the host names and IPs clients
  dial as subject alternative names) and one SSH-format ECDSA key pair per SuperNode.
- ``deploy.superlink``: the ``flower-superlink`` command (TLS, node authentication, no runtime
  dependency installation).
- ``deploy.nodes``: ``flwr supernode register`` for the nodes' public keys, and the
  ``flower-supernode`` command of node ``i`` (its ``partition-id``/``num-partitions``, its port).
- ``deploy.cliconfig``: the ``[superlink.NAME]`` entry of ``$FLWR_HOME/config.toml`` that lets
  ``flwr run`` / ``flwr ls`` reach a TLS SuperLink.
- ``deploy.local``: a whole federation on this machine (loopback or network namespaces), managed
  by PID; used by the integration tests and for rehearsing a deployment.
- ``deploy.netns``: throw-away network namespaces joined by a bridge, so processes on one machine
  talk over real interfaces as separate hosts would.
- ``deploy.procs``: processes started and stopped by PID with their whole tree, free ports.

Every module has a ``python -m deploy.<name> --help`` command line.
"""
