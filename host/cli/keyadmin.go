package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"

	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// ---- keys create | disable | enable ---------------------------------------

const keyAdminUsage = `Usage: nitrosign keys create --type rsa|ecc|ed25519 [flags]
       nitrosign keys disable|enable [flags] KEY_ID

Rotates a sealed keyset (an enclave run with --key-mode sealed): create
adds a new version of a key type, which becomes the type's default (Sign
with --key-type selects it); disable stops a key from signing (it stays
listed, so what it signed can still be verified); enable lets it sign
again. Each change is sealed with a new data key from AWS KMS and stored
by the host (the previous sealed keyset is kept beside it) before the
enclave uses it. Other enclaves of the keyset take it within 30 s.

Examples:
  nitrosign keys create --type rsa
  nitrosign keys disable 3f2a...e9
`

// keyAdminVerbs are the subcommands of keys that change the keyset.
var keyAdminVerbs = map[string]bool{"create": true, "disable": true, "enable": true}

func runKeyAdmin(ctx context.Context, c *cmd, verb string, args []string) error {
	c.Usage = func() {
		fmt.Fprint(c.Stderr, keyAdminUsage)
		fmt.Fprintln(c.Stderr, "\nFlags:")
		c.PrintDefaults()
	}
	typ := c.String("type", "", "create: the key type, rsa, ecc or ed25519 (its size or curve is the enclave's)")
	if err := c.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	var keyID string
	switch {
	case verb == "create" && c.NArg() > 0:
		return usagef("keys create takes no argument (give --type)")
	case verb == "create" && *typ == "":
		return usagef("keys create needs --type rsa|ecc|ed25519")
	case verb != "create" && *typ != "":
		return usagef("--type is for keys create")
	case verb != "create" && c.NArg() != 1:
		return usagef("keys %s needs one KEY_ID (see nitrosign keys)", verb)
	case verb != "create":
		keyID = c.Arg(0)
	}
	if err := c.validate(); err != nil {
		return err
	}
	var t pb.KeyType
	if verb == "create" {
		var err error
		if t, err = parseKeyType(*typ); err != nil {
			return usagef("--type %q: want rsa, ecc or ed25519", *typ)
		}
	}
	ctx, cl, done, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer done()
	var k *pb.KeyInfo
	switch verb {
	case "create":
		r, err := cl.KeyAdmin.CreateKey(ctx, &pb.CreateKeyRequest{KeyType: t})
		if err != nil {
			return err
		}
		k = r.GetKey()
	case "disable":
		r, err := cl.KeyAdmin.DisableKey(ctx, &pb.DisableKeyRequest{KeyId: keyID})
		if err != nil {
			return err
		}
		k = r.GetKey()
	case "enable":
		r, err := cl.KeyAdmin.EnableKey(ctx, &pb.EnableKeyRequest{KeyId: keyID})
		if err != nil {
			return err
		}
		k = r.GetKey()
	}
	if c.output == "json" {
		return printJSON(c.Stdout, toKeyJSON(k))
	}
	j := toKeyJSON(k)
	fmt.Fprintf(c.Stdout, "%s %s %s version %d: %s%s\n", j.KeyID, j.KeyType, j.KeySpec, k.GetVersion(), stateName(k.GetKeyState()), defaultNote(k))
	return nil
}

func stateName(s pb.KeyState) string {
	switch s {
	case pb.KeyState_KEY_STATE_DISABLED:
		return "DISABLED"
	default:
		return "ENABLED"
	}
}

func defaultNote(k *pb.KeyInfo) string {
	if k.GetTypeDefault() {
		return " (the type's default)"
	}
	return ""
}
