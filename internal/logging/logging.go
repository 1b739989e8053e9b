// Package logging builds the zap logger every nitrosign binary uses and
// routes fx's own events to it.
package logging

import (
	"fmt"
	"io"
	"os"

	"go.uber.org/dig"
	"go.uber.org/fx"
	"go.uber.org/fx/fxevent"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Config selects the level and encoding of log output.
type Config struct {
	// Level is debug, info, warn or error. Default info.
	Level string
	// Format is json (default, for log shippers) or console (for people).
	Format string
}

// Validate reports a precise error for an unknown level or format.
func (c Config) Validate() error {
	if _, err := zapcore.ParseLevel(c.level()); err != nil {
		return fmt.Errorf("log level %q: want debug, info, warn or error", c.Level)
	}
	switch c.format() {
	case "json", "console":
	default:
		return fmt.Errorf("log format %q: want json or console", c.Format)
	}
	return nil
}

func (c Config) level() string {
	if c.Level == "" {
		return "info"
	}
	return c.Level
}

func (c Config) format() string {
	if c.Format == "" {
		return "json"
	}
	return c.Format
}

// New builds a logger writing to w (os.Stderr when nil).
func New(c Config, w io.Writer) (*zap.Logger, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	lvl, _ := zapcore.ParseLevel(c.level())
	if w == nil {
		w = os.Stderr
	}
	var enc zapcore.Encoder
	if c.format() == "console" {
		ec := zap.NewDevelopmentEncoderConfig()
		ec.EncodeTime = zapcore.ISO8601TimeEncoder
		enc = zapcore.NewConsoleEncoder(ec)
	} else {
		ec := zap.NewProductionEncoderConfig()
		ec.TimeKey = "ts"
		ec.EncodeTime = zapcore.RFC3339NanoTimeEncoder
		enc = zapcore.NewJSONEncoder(ec)
	}
	core := zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(w)), lvl)
	return zap.New(core, zap.ErrorOutput(zapcore.Lock(zapcore.AddSync(w)))), nil
}

// FxLogger sends fx's lifecycle events to log at debug level, so start-up is
// quiet by default and fully traceable with --log-level debug. fx's own error
// events are debug too: each main logs the root cause once (RootCause).
func FxLogger() fx.Option {
	return fx.WithLogger(func(log *zap.Logger) fxevent.Logger {
		l := &fxevent.ZapLogger{Logger: log.Named("fx")}
		l.UseLogLevel(zapcore.DebugLevel)
		l.UseErrorLevel(zapcore.DebugLevel)
		return l
	})
}

// RootCause strips fx's and dig's dependency-graph wrapping from a start-up
// error, leaving the error the failing constructor returned.
func RootCause(err error) error {
	return dig.RootCause(err)
}
