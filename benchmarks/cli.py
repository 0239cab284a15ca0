"""`lumen bench ...`: the loop ablations (no subcommand), the brightness and adherence studies,
the GPU check, serving load."""


def add_parsers(subparsers) -> None:
    from . import adherence, brightness, controlnet, deepcache, gpu_check, inpaint, report, serve_load

    bench = subparsers.add_parser(
        "bench", help="cumulative ablations of the sampling loop, or a study",
        description="Cumulative ablations of one request's sampling loop (see "
                    "benchmarks/ablation.py), `lumen bench brightness`, `lumen bench adherence`, "
                    "`lumen bench inpaint`, `lumen bench controlnet`, `lumen bench deepcache`, "
                    "`lumen bench gpu` or `lumen bench serve`.")
    report.add_arguments(bench)
    bench.set_defaults(func=report.run)
    which = bench.add_subparsers(dest="bench", required=False)
    studies = [
        ("brightness", brightness, "brightness study of the built-in models (Lin et al.)"),
        ("adherence", adherence, "how often the built-in models draw the prompt's background, "
                                 "colour and shape"),
        ("inpaint", inpaint, "inpainting and image-to-image on the built-in model, scored by "
                             "the scene analyzer"),
        ("controlnet", controlnet, "the built-in ControlNet: is the shape where the control "
                                   "mask says"),
        ("deepcache", deepcache, "DeepCache's quality (adherence, brightness, PSNR) and the step "
                                 "scheduler's split, against interval 1"),
        ("gpu", gpu_check, "time-boxed check of a GPU host: tests, kernels, bench rows, graph "
                           "soak, VAE (--dry-run: on CPU)"),
        ("serve", serve_load, "lumen serve under 1, 4, 16 clients, batching on vs off"),
    ]
    for name, module, text in studies:
        p = which.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
