package pool

import (
	"context"

	"go.uber.org/fx"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/internal/target"
)

// Module provides a *Pool built from the target.Target and Config in the
// graph, closed when the app stops. Close is idempotent, so an owner that
// closes the pool itself (the proxy does, after draining) is fine.
var Module = fx.Module("pool", fx.Provide(provide))

// Params are the pool's dependencies in an fx graph.
type Params struct {
	fx.In

	Target    target.Target
	Config    Config
	Log       *zap.Logger
	Lifecycle fx.Lifecycle
}

func provide(p Params) (*Pool, error) {
	pl, err := New(p.Target, p.Config, p.Log)
	if err != nil {
		return nil, err
	}
	p.Lifecycle.Append(fx.Hook{OnStop: func(context.Context) error { return pl.Close() }})
	return pl, nil
}
