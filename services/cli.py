"""The `openlora` command: it only mounts each package's command group.

openlora gateway serve | config          openlora worker serve | config
openlora store serve | config            openlora attribution serve | config | migrate
openlora adapters upload | import | list | show | download | delete | register-base
openlora rewards show, openlora usage show
openlora up | demo | generate | health | secret new | version    (services/cluster/cli.py)
"""

from __future__ import annotations

import typer

from services.adapter_store import cli as store_cli
from services.attribution import cli as attribution_cli
from services.cluster import cli as cluster_cli
from services.common.parent_death import die_with_parent_if_asked
from services.gateway import cli as gateway_cli
from services.inference import cli as worker_cli

app = typer.Typer(
    help="OpenLoRA: serve thousands of LoRA adapters from one base model.", no_args_is_help=True
)
app.add_typer(gateway_cli.app, name="gateway")
app.add_typer(worker_cli.app, name="worker")
app.add_typer(store_cli.app, name="store")
app.add_typer(store_cli.adapters_app, name="adapters")
app.add_typer(attribution_cli.app, name="attribution")
app.add_typer(attribution_cli.rewards_app, name="rewards")  # openlora rewards show --contributor ...
app.add_typer(attribution_cli.usage_app, name="usage")  # openlora usage show --adapter ...
app.add_typer(cluster_cli.app)  # its commands at the top level: openlora up, openlora demo, ...


def main() -> None:
    die_with_parent_if_asked()  # a service started by `openlora up` ends with it
    app()


if __name__ == "__main__":
    main()
