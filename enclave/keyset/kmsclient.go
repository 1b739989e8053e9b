package keyset

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	_ "embed"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"

	"github.com/nitrosign/nitrosign/internal/target"
)

// amazonRoots are the CAs a KMS endpoint's certificate chains to: Amazon
// Trust Services' roots (and Starfield Services Root G2, which
// cross-signs them), from Mozilla's root store. They are compiled in, and
// so measured into the PCRs: the enclave trusts no other CA for KMS, and
// the parent, which relays the TLS connection, cannot read or change it.
//
//go:embed amazon-roots.pem
var amazonRoots []byte

// RegionOf returns the region of a KMS key ARN
// (arn:PARTITION:kms:REGION:ACCOUNT:key/ID).
func RegionOf(keyARN string) (string, error) {
	f := strings.Split(keyARN, ":")
	if len(f) != 6 || f[0] != "arn" || f[1] == "" || f[2] != "kms" || f[3] == "" || f[4] == "" || !strings.HasPrefix(f[5], "key/") || len(f[5]) == len("key/") {
		return "", fmt.Errorf("KMS key %q: want the ARN of a key, arn:aws:kms:REGION:ACCOUNT:key/ID (not an alias: the ARN is measured, an alias can be moved)", keyARN)
	}
	return f[3], nil
}

// kmsTimeouts bound each KMS exchange; the SDK retries (kmsAttempts in
// all) with its own backoff, and the manager retries the whole operation.
const (
	kmsAttempts         = 3
	kmsHandshakeTimeout = 10 * time.Second
	kmsResponseTimeout  = 20 * time.Second
)

// newKMSClient is the official KMS client for the region of cfg's key,
// unmodified but for its transport: every connection is dialled to
// cfg.KMSProxy (the parent's forwarder, which relays it to the regional
// endpoint) and TLS trusts only the Amazon roots (or cfg.KMSCAFile). The
// endpoint stays the SDK's own (https://kms.REGION.amazonaws.com) unless
// cfg.KMSEndpoint names another.
func newKMSClient(cfg Config, creds aws.CredentialsProvider) (*kms.Client, error) {
	region, err := RegionOf(cfg.KMSKeyARN)
	if err != nil {
		return nil, err
	}
	proxy, err := target.Parse(cfg.KMSProxy)
	if err != nil {
		return nil, fmt.Errorf("KMS proxy: %w", err)
	}
	pemRoots := amazonRoots
	if cfg.KMSCAFile != "" {
		if pemRoots, err = os.ReadFile(cfg.KMSCAFile); err != nil {
			return nil, fmt.Errorf("KMS CA file: %w", err)
		}
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemRoots) {
		return nil, errors.New("KMS CA roots: no PEM certificate found")
	}
	tr := &http.Transport{
		// The address the SDK dials (the endpoint's host) is not where
		// the connection goes: the enclave has no network, only the
		// parent over vsock. TLS still verifies the endpoint's name.
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return proxy.Dial(ctx) },
		TLSClientConfig: &tls.Config{
			RootCAs:    roots,
			MinVersion: tls.VersionTLS12,
		},
		ForceAttemptHTTP2:     true,
		TLSHandshakeTimeout:   kmsHandshakeTimeout,
		ResponseHeaderTimeout: kmsResponseTimeout,
		MaxIdleConns:          2,
		IdleConnTimeout:       time.Minute,
	}
	opts := kms.Options{
		Region:           region,
		Credentials:      aws.NewCredentialsCache(creds, func(o *aws.CredentialsCacheOptions) { o.ExpiryWindow = 5 * time.Minute }),
		HTTPClient:       &http.Client{Transport: tr},
		RetryMaxAttempts: kmsAttempts,
	}
	if cfg.KMSEndpoint != "" {
		opts.BaseEndpoint = aws.String(cfg.KMSEndpoint)
	}
	return kms.New(opts), nil
}
