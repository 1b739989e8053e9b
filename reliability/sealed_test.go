package reliability_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"google.golang.org/grpc"

	"github.com/nitrosign/nitrosign/enclave"
	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/fakes/devroot"
	"github.com/nitrosign/nitrosign/fakes/kmsfake"
	"github.com/nitrosign/nitrosign/host/keystore"
	"github.com/nitrosign/nitrosign/host/proxy"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// sealedConfig is a sealed enclave's configuration against a test KMS
// and a host keystore served at hostTarget.
func sealedConfig(t *testing.T, kms *kmsfake.Server, hostTarget, rootFile string) enclave.Config {
	t.Helper()
	caFile := filepath.Join(t.TempDir(), "kms-ca.pem")
	if err := os.WriteFile(caFile, kms.CAPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	c := enclaveConfig(nil)
	c.Signer.KeyMode = signer.Sealed
	c.Attest.DevRootFile = rootFile
	c.Keyset.KMSKeyARN = kmsfake.KeyARN
	c.Keyset.HostAddr = hostTarget
	c.Keyset.KMSProxy = "tcp://" + kms.Addr
	c.Keyset.KMSCAFile = caFile
	c.Keyset.RetryMin, c.Keyset.RetryMax = 20*time.Millisecond, 200*time.Millisecond
	c.Keyset.RefreshInterval = 200 * time.Millisecond
	return c
}

// Two sealed enclaves behind one proxy share one keyset through the
// host's keystore (the file the proxy keeps). A rotation on one reaches
// the other; then the other restarts. The proxy has the keyset of the one
// that stayed up on record from before the rotation, so the restarted one
// looks different at first: the proxy reads every keyset again at once
// and keeps both in rotation, and a Sign by the new key id succeeds
// wherever it lands.
func TestMultiEnclaveSealedRotation(t *testing.T) {
	log := testLogger(t, nil)
	rootPEM, err := devroot.New()
	if err != nil {
		t.Fatal(err)
	}
	root, err := devroot.Root(rootPEM)
	if err != nil {
		t.Fatal(err)
	}
	rootFile := filepath.Join(t.TempDir(), "dev-root.pem")
	if err := os.WriteFile(rootFile, rootPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	kms, err := kmsfake.Start(kmsfake.New(root, map[uint][]byte{0: attest.SimulatedPCRs()[0]}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kms.Close() })

	path := filepath.Join(t.TempDir(), "keyset.sealed")
	if _, err := keystore.RequestInit(path, time.Now()); err != nil {
		t.Fatal(err)
	}
	store, err := keystore.NewStore(path, log)
	if err != nil {
		t.Fatal(err)
	}
	creds := keystore.NewCredentials(aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
		return kmsfake.Credentials(), nil
	}), "the test")
	hs := keystore.NewServer(keystore.Config{}, store, creds, log)
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = hs.Serve(hl) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		hs.Stop(ctx)
	})
	cfg := sealedConfig(t, kms, "tcp://"+hl.Addr().String(), rootFile)

	a := startEnclave(t, cfg, 0, log)
	waitKeys(t, dial(t, a.addr), 3)
	b := startEnclave(t, cfg, 0, log)
	bPort := b.port()
	p := startProxy(t, proxyConfig(a.target(), func(c *proxy.Config) {
		c.Upstreams = []string{a.target(), b.target()}
		c.Pool.Size = 2
	}), 0, log)
	p.waitReady(t, 4)

	created, err := pb.NewKeyAdminServiceClient(dial(t, a.addr)).CreateKey(callCtx(t), &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_ECC})
	if err != nil {
		t.Fatal(err)
	}
	newID := created.GetKey().GetKeyId()
	waitKeys(t, dial(t, b.addr), 4) // B takes the rotated keyset from the host

	b.stop()
	startEnclave(t, cfg, bPort, log)
	eventually(t, 20*time.Second, "both enclaves in rotation after B restarted with the rotated keyset", func() bool {
		return p.pool.Ready() == 4 &&
			p.metric(t, "nitrosign_proxy_upstream_keyset_mismatch", map[string]string{"upstream": a.target()}) == 0 &&
			p.metric(t, "nitrosign_proxy_upstream_keyset_mismatch", map[string]string{"upstream": b.target()}) == 0
	})
	cc := dial(t, p.addr)
	sc := pb.NewSignerServiceClient(cc)
	for i := range 40 {
		_, err := sc.Sign(callCtx(t), &pb.SignRequest{Key: &pb.KeySelector{Selector: &pb.KeySelector_KeyId{KeyId: newID}}, Message: []byte(fmt.Sprint(i))})
		if err != nil {
			t.Fatalf("Sign %d by the new key id through the proxy: %v", i, err)
		}
	}
}

// waitKeys waits until the enclave lists n keys.
func waitKeys(t *testing.T, cc *grpc.ClientConn, n int) {
	t.Helper()
	c := pb.NewSignerServiceClient(cc)
	eventually(t, 20*time.Second, fmt.Sprintf("%d keys listed", n), func() bool {
		r, err := c.ListKeys(callCtx(t), &pb.ListKeysRequest{})
		return err == nil && len(r.GetKeys()) == n
	})
}
