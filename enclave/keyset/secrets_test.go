package keyset_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"net/http"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/nitrosign/nitrosign/enclave/attest"
	"github.com/nitrosign/nitrosign/enclave/enclavetest"
	"github.com/nitrosign/nitrosign/enclave/sealing"
	"github.com/nitrosign/nitrosign/fakes/kmsfake"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// forms is b as it is and in the text forms a logger could give it.
func forms(b []byte) [][]byte {
	out := [][]byte{b, []byte(hex.EncodeToString(b)), []byte(strings.ToUpper(hex.EncodeToString(b)))}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding} {
		out = append(out, []byte(enc.EncodeToString(b)))
	}
	return out
}

// No key byte, data key or credential reaches a log line, at debug level,
// through init, signing, rotation and a restart of a sealed enclave.
func TestNoSecretInLogs(t *testing.T) {
	e := newEnv(t)
	e.host.init = true
	core, logs := observer.New(zapcore.DebugLevel)
	cfg := e.config()
	cfg.Log.Level = "debug"
	start := func() *client {
		en, err := enclavetest.Run(cfg, zap.New(core), 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = en.Stop() })
		c := dial(t, en)
		c.waitServing(t)
		return c
	}
	c := start()
	if _, err := c.sign(t, byType(pb.KeyType_KEY_TYPE_ED25519), "m"); err != nil {
		t.Fatal(err)
	}
	k, err := c.admin.CreateKey(ctx(t), &pb.CreateKeyRequest{KeyType: pb.KeyType_KEY_TYPE_ECC})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.admin.DisableKey(ctx(t), &pb.DisableKeyRequest{KeyId: k.GetKey().GetKeyId()}); err != nil {
		t.Fatal(err)
	}
	start() // a restart: unseals

	// What must not appear: every private key of the keyset (opened here
	// with a KMS client of the test's own), every data key KMS made, and
	// the credentials.
	var secrets [][]byte
	for _, dk := range e.kms.KMS.DataKeys() {
		secrets = append(secrets, forms(dk)...)
	}
	creds := kmsfake.Credentials()
	secrets = append(secrets, []byte(creds.SecretAccessKey), []byte(creds.SessionToken))
	sim, err := attest.Open(attest.Config{DevSimulatedNSM: true, DevRootFile: e.rootFile, DevicePath: "/nonexistent/nsm"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(e.kms.CAPEM)
	client := kms.New(kms.Options{
		Region: kmsfake.Region, Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) { return creds, nil }),
		BaseEndpoint: aws.String("https://" + e.kms.Addr),
		HTTPClient:   &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConfig(roots)}},
	})
	dks, err := sealing.NewDataKeys(client, sim, kmsfake.KeyARN)
	if err != nil {
		t.Fatal(err)
	}
	ks, err := sealing.Unseal(ctx(t), e.host.get(), dks)
	if err != nil {
		t.Fatal(err)
	}
	if len(ks.Keys) != 4 {
		t.Fatalf("%d keys in the keyset, want 4", len(ks.Keys))
	}
	for _, k := range ks.Keys {
		der, err := x509.MarshalPKCS8PrivateKey(k.Private)
		if err != nil {
			t.Fatal(err)
		}
		secrets = append(secrets, forms(der)...)
		switch p := k.Private.(type) {
		case *ecdsa.PrivateKey:
			d, _ := p.Bytes()
			secrets = append(secrets, forms(d)...)
		case *rsa.PrivateKey:
			secrets = append(secrets, forms(p.D.Bytes())...)
			secrets = append(secrets, forms(p.Primes[0].Bytes())...)
		case ed25519.PrivateKey:
			secrets = append(secrets, forms(p.Seed())...)
		}
	}
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	entries := logs.All()
	if len(entries) < 10 {
		t.Fatalf("only %d log lines: the guard would prove nothing", len(entries))
	}
	for _, en := range entries {
		buf, err := enc.EncodeEntry(en.Entry, en.Context)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range secrets {
			if bytes.Contains(buf.Bytes(), s) {
				t.Fatalf("a log line carries a secret: %s", en.Message)
			}
		}
		buf.Free()
	}
	t.Logf("%d log lines at debug level, %d secret forms searched: none found", len(entries), len(secrets))
}

func tlsConfig(roots *x509.CertPool) *tls.Config {
	return &tls.Config{RootCAs: roots, ServerName: kmsfake.Host, MinVersion: tls.VersionTLS12}
}
