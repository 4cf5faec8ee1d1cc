"""`openlora generate`: one generation from the command line, printed as it streams."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from openlora.errors import OpenLoRAError
from openlora.request import STRATEGIES, GenerateOptions, parse_mix
from openlora.sync import Client


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    adapter: Annotated[
        str | None, typer.Option(help="Adapter `id`, `id@version` or a source URI (hf://, s3://, https://).")
    ] = None,
    mix: Annotated[str | None, typer.Option(help="A mix instead of one adapter: `ID:W,ID:W`.")] = None,
    strategy: Annotated[str, typer.Option(help=f"Mix strategy: {', '.join(STRATEGIES)}.")] = "linear",
    density: Annotated[float, typer.Option(help="TIES/DARE density in (0, 1].")] = 0.0,
    rank: Annotated[int, typer.Option(help="TIES/DARE rank (0 = the largest component rank).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="0 = the server's default.")] = 0,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 0.0,
    top_k: Annotated[int, typer.Option()] = 0,
    seed: Annotated[int, typer.Option(help="Sampling seed (same seed, same output).")] = 0,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they arrive.")] = True,
    target: Annotated[
        str, typer.Option(envvar="OPENLORA_TARGET", help="Gateway (or worker) host:port.")
    ] = "127.0.0.1:50051",
    api_key: Annotated[
        str | None, typer.Option(envvar="OPENLORA_API_KEY", help="API key (sent as a Bearer token).")
    ] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA bundle for TLS.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds for the whole call, retries included.")] = 300.0,
) -> None:
    """Generate from the base model, an adapter or a mix, through the gateway."""
    try:
        components = parse_mix(mix) if mix is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mix") from None
    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"use one of {', '.join(STRATEGIES)}", param_hint="--strategy")
    if adapter is not None and components is not None:
        raise typer.BadParameter("give --adapter or --mix, not both", param_hint="--mix")
    options: GenerateOptions = {
        "adapter": adapter,
        "mix": components,
        "strategy": strategy,
        "density": density,
        "rank": rank,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
    }
    with Client(target, api_key=api_key, ca_file=ca_file, timeout_s=timeout) as client:
        try:
            if stream:
                finish = None
                for chunk in client.stream(prompt, **options):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    if chunk.finish_reason:
                        finish = (chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens)
                sys.stdout.write("\n")
                if finish:
                    typer.echo(f"[{finish[0]}: {finish[1]} prompt + {finish[2]} completion tokens]", err=True)
            else:
                completion = client.generate(prompt, **options)
                typer.echo(completion.text)
                typer.echo(
                    f"[{completion.finish_reason}: {completion.prompt_tokens} prompt + "
                    f"{completion.completion_tokens} completion tokens]",
                    err=True,
                )
        except OpenLoRAError as exc:
            typer.echo(f"error: {exc}", err=True)
            for field, problem in exc.field_violations.items():
                typer.echo(f"  {field}: {problem}", err=True)
            raise typer.Exit(1) from None
