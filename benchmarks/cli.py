"""`lumen bench ...`: the loop ablations (no subcommand), the brightness and adherence studies,
the GPU check, serving load."""


def add_parsers(subparsers) -> None:
    from . import adherence, brightness, controlnet, deepcache, gpu_check, inpaint, report, serve_load

    bench = subparsers.add_parser(
        "bench", help="cumulative ablations of the sampling loop, or a study",
        description="Cumulative ablations of one request's sampling loop (see "
                    "benchmarks/ablation.py), `lumen bench brightness`, `lumen bench adherence`, "
                    "`lumen bench inpaint`, `lumen bench controlnet`, `lumen bench deepcache`, `lumen bench gpu` or `lumen bench serve`.")
    report.add_arguments(bench)
    bench.set_defaults(func=report.run)
    which = bench.add_subparsers(dest="bench", required=False)
    p = which.add_parser("brightness", help="brightness study of the built-in models (Lin et al.)")
    brightness.add_arguments(p)
    p.set_defaults(func=brightness.run)
    p = which.add_parser("adherence", help="how often the built-in models draw the prompt's "
                                           "background, colour and shape")
    adherence.add_arguments(p)
    p.set_defaults(func=adherence.run)
    p = which.add_parser("inpaint", help="inpainting and image-to-image on the built-in model, "
                                         "scored by the scene analyzer")
    inpaint.add_arguments(p)
    p.set_defaults(func=inpaint.run)
    p = which.add_parser("controlnet", help="the built-in ControlNet: is the shape where the "
                                            "control mask says")
    controlnet.add_arguments(p)
    p.set_defaults(func=controlnet.run)
    p = which.add_parser("deepcache", help="DeepCache's quality (adherence, brightness, PSNR) "
                                           "and the step scheduler's split, against interval 1")
    deepcache.add_arguments(p)
    p.set_defaults(func=deepcache.run)
    p = which.add_parser("gpu", help="time-boxed check of a GPU host: tests, kernels, bench "
                                     "rows, graph soak, VAE (--dry-run: on CPU)")
    gpu_check.add_arguments(p)
    p.set_defaults(func=gpu_check.run)
    p = which.add_parser("serve", help="lumen serve under 1, 4, 16 clients, batching on vs off")
    serve_load.add_arguments(p)
    p.set_defaults(func=serve_load.run)
