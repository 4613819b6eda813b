// Command shipwright-build-controller runs Shipwright's own build controller (the reconcilers of
// github.com/shipwright-io/build, unchanged) with two settings upstream's main hard-codes:
// its metrics listener (fixed at 0.0.0.0:8383 upstream) comes from --metrics-bind-address,
// 127.0.0.1 with a free port by default, and leader election is off. So one controller can run
// per local control plane, several on one machine, and a restart never waits for a stale lease.
package main

import (
	"flag"
	"os"

	"github.com/spf13/pflag"
	"github.com/tektoncd/pipeline/pkg/apis/pipeline"
	pipelinev1beta1 "github.com/tektoncd/pipeline/pkg/apis/pipeline/v1beta1"
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	"sigs.k8s.io/controller-runtime/pkg/client/config"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	"sigs.k8s.io/controller-runtime/pkg/manager/signals"
	"sigs.k8s.io/controller-runtime/pkg/metrics/server"

	buildconfig "github.com/shipwright-io/build/pkg/config"
	"github.com/shipwright-io/build/pkg/controller"
	"github.com/shipwright-io/build/pkg/ctxlog"
	buildMetrics "github.com/shipwright-io/build/pkg/metrics"
	"github.com/shipwright-io/build/version"
)

func main() {
	metricsAddr := pflag.String("metrics-bind-address", "127.0.0.1:0", "metrics listener (port 0: any free port)")
	pflag.CommandLine.AddGoFlagSet(ctxlog.CustomZapFlagSet())
	pflag.CommandLine.AddGoFlagSet(flag.CommandLine)
	pflag.Parse()

	ctx := ctxlog.NewParentContext(ctxlog.NewLogger("build"))
	version.SetVersion("v0.20.13")
	fail := func(err error, msg string) {
		ctxlog.Error(ctx, err, msg)
		os.Exit(1)
	}

	cfg, err := config.GetConfig()
	if err != nil {
		fail(err, "no kubeconfig")
	}
	buildCfg := buildconfig.NewDefaultConfig()
	if err := buildCfg.SetConfigFromEnv(); err != nil {
		fail(err, "bad configuration in the environment")
	}
	mgr, err := controller.NewManager(ctx, buildCfg, cfg, manager.Options{
		LeaderElection: false,
		Metrics:        server.Options{BindAddress: *metricsAddr},
	})
	if err != nil {
		fail(err, "cannot create the manager")
	}
	// As upstream: without Tekton's TaskRun API the controller cannot work, so say so and stop.
	if _, err := mgr.GetRESTMapper().KindFor(pipeline.TaskRunResource.WithVersion(pipelinev1beta1.SchemeGroupVersion.Version)); err != nil {
		fail(err, "Tekton's TaskRun API is not installed on the cluster")
	}
	buildMetrics.InitPrometheus(buildCfg)
	ctxlog.Info(ctx, "Starting the Cmd.")
	if err := mgr.Start(signals.SetupSignalHandler()); err != nil {
		fail(err, "manager exited non-zero")
	}
}
