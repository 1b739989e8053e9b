package keystore_test

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/fx"
	"go.uber.org/fx/fxtest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/nitrosign/nitrosign/host/keystore"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

func TestModule(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	path := filepath.Join(t.TempDir(), "keyset.sealed")
	var addr string
	app := fxtest.New(t,
		fx.Supply(keystore.Config{Port: 5051, Path: path}),
		fx.Supply(zap.New(core)),
		fx.Supply(staticCreds(time.Now().Add(time.Hour))),
		fx.Provide(func() keystore.ListenFunc {
			return func() (net.Listener, error) {
				l, err := net.Listen("tcp", "127.0.0.1:0")
				if err == nil {
					addr = l.Addr().String()
				}
				return l, err
			}
		}),
		keystore.Module,
	)
	app.RequireStart()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	got, err := pb.NewHostServiceClient(cc).GetSealedKeyset(callCtx(t), &pb.GetSealedKeysetRequest{})
	if err != nil || got.GetLocation() != path {
		t.Fatalf("GetSealedKeyset: %v, location %q", err, got.GetLocation())
	}
	app.RequireStop()
	for _, msg := range []string{"no sealed keyset yet", "serving the enclaves' host service", "AWS credentials for enclaves available"} {
		if logs.FilterMessageSnippet(msg).Len() != 1 {
			t.Errorf("no %q line: %v", msg, logs.All())
		}
	}
	assertNoSecretLogged(t, logs)
}

// Port 0: nothing listens, nothing is loaded.
func TestModuleOff(t *testing.T) {
	app := fxtest.New(t,
		fx.Supply(keystore.Config{Port: 0, Path: "relative/is/not/even/checked"}),
		fx.Supply(zap.NewNop()),
		fx.Provide(func() keystore.ListenFunc {
			return func() (net.Listener, error) { t.Error("listened with port 0"); return nil, nil }
		}),
		keystore.Module,
	)
	app.RequireStart().RequireStop()
}

func TestModuleStartFailures(t *testing.T) {
	for _, tt := range []struct {
		name string
		path string
		want string
	}{
		{"no directory", filepath.Join(t.TempDir(), "missing", "keyset.sealed"), "StateDirectory=nitrosign"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			app := fx.New(
				fx.NopLogger,
				fx.Supply(keystore.Config{Port: 5051, Path: tt.path}),
				fx.Supply(zap.NewNop()),
				fx.Supply(staticCreds(time.Time{})),
				fx.Provide(func() keystore.ListenFunc {
					return func() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }
				}),
				keystore.Module,
			)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err := app.Start(ctx)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Start = %v, want %q", err, tt.want)
			}
		})
	}
	t.Run("relative path", func(t *testing.T) {
		app := fx.New(fx.NopLogger, fx.Supply(keystore.Config{Port: 5051, Path: "keyset.sealed"}), fx.Supply(zap.NewNop()), keystore.Module)
		if err := app.Err(); err == nil || !strings.Contains(err.Error(), "want an absolute path") {
			t.Fatalf("Err = %v", err)
		}
	})
}
