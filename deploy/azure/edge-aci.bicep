// The acs-relay edge on Azure Container Instances: one container group with a public IP that
// carries the tunnel on UDP (QUIC) and TCP (the fallback), and HTTPS for ACS.
//
// ACI has no TLS-terminating ingress, so a Caddy sidecar takes 443 (and 80 for its ACME
// challenge), obtains a certificate for the group's FQDN, and forwards to the edge on
// localhost:8080. The edge's state lives on an Azure Files share; an init container creates it
// on first start (`init --if-missing`).

@description('Region for every resource.')
param location string = resourceGroup().location

@description('Prefix for resource names.')
param name string = 'acs-relay'

@description('DNS label: the edge is reachable at LABEL.REGION.azurecontainer.io.')
param dnsLabel string

@description('The edge image (deploy/docker/build.sh, pushed to your registry).')
param edgeImage string

@description('Registry server hosting the image, e.g. myregistry.azurecr.io.')
param registryServer string

@description('User-assigned identity (resource id) with AcrPull on the registry.')
param registryIdentityId string

@description('TLS front for ACS; any image that terminates TLS for the FQDN will do.')
param tlsImage string = 'caddy:2'

@description('Tunnel port, on UDP (QUIC) and TCP (TLS/TCP fallback).')
param tunnelPort int = 4433

var fqdn = '${dnsLabel}.${location}.azurecontainer.io'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: take(replace('${name}state${uniqueString(resourceGroup().id)}', '-', ''), 24)
  location: location
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
  }
}

resource fileService 'Microsoft.Storage/storageAccounts/fileServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource stateShare 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileService
  name: 'edge-state'
  properties: {
    shareQuota: 1
  }
}

resource tlsShare 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileService
  name: 'tls-state'
  properties: {
    shareQuota: 1
  }
}

resource group 'Microsoft.ContainerInstance/containerGroups@2023-05-01' = {
  name: '${name}-edge'
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${registryIdentityId}': {}
    }
  }
  properties: {
    osType: 'Linux'
    restartPolicy: 'Always'
    imageRegistryCredentials: [
      {
        server: registryServer
        identity: registryIdentityId
      }
    ]
    ipAddress: {
      type: 'Public'
      dnsNameLabel: dnsLabel
      ports: [
        {
          port: 443
          protocol: 'TCP'
        }
        {
          port: 80
          protocol: 'TCP'
        }
        {
          port: tunnelPort
          protocol: 'UDP'
        }
        {
          port: tunnelPort
          protocol: 'TCP'
        }
      ]
    }
    initContainers: [
      {
        name: 'init'
        properties: {
          image: edgeImage
          command: [
            '/usr/local/bin/relay-edge'
            'init'
            '--if-missing'
            '--name'
            fqdn
          ]
          volumeMounts: [
            {
              name: 'state'
              mountPath: '/var/lib/acs-relay'
            }
          ]
        }
      }
    ]
    containers: [
      {
        name: 'edge'
        properties: {
          image: edgeImage
          command: [
            '/usr/local/bin/relay-edge'
            'run'
          ]
          environmentVariables: [
            {
              name: 'RELAY_EDGE_LISTEN'
              value: '127.0.0.1:8080'
            }
            {
              name: 'RELAY_EDGE_TUNNEL_LISTEN'
              value: '0.0.0.0:${tunnelPort}'
            }
            {
              // Caddy, on localhost, sets X-Forwarded-*.
              name: 'RELAY_EDGE_TRUSTED_PROXIES'
              value: '127.0.0.1/32'
            }
          ]
          ports: [
            {
              port: tunnelPort
              protocol: 'UDP'
            }
            {
              port: tunnelPort
              protocol: 'TCP'
            }
          ]
          // Sized from relay-bench: about half a core per 200 concurrent calls.
          resources: {
            requests: {
              cpu: 1
              memoryInGB: 1
            }
          }
          livenessProbe: {
            exec: {
              command: [
                '/usr/local/bin/relay-edge'
                'health'
              ]
            }
            periodSeconds: 10
          }
          volumeMounts: [
            {
              name: 'state'
              mountPath: '/var/lib/acs-relay'
            }
          ]
        }
      }
      {
        name: 'tls'
        properties: {
          image: tlsImage
          command: [
            'caddy'
            'reverse-proxy'
            '--from'
            fqdn
            '--to'
            '127.0.0.1:8080'
          ]
          ports: [
            {
              port: 443
              protocol: 'TCP'
            }
            {
              port: 80
              protocol: 'TCP'
            }
          ]
          resources: {
            requests: {
              cpu: json('0.5')
              memoryInGB: json('0.5')
            }
          }
          volumeMounts: [
            {
              name: 'tls'
              mountPath: '/data'
            }
          ]
        }
      }
    ]
    volumes: [
      {
        name: 'state'
        azureFile: {
          shareName: stateShare.name
          storageAccountName: storage.name
          storageAccountKey: storage.listKeys().keys[0].value
        }
      }
      {
        name: 'tls'
        azureFile: {
          shareName: tlsShare.name
          storageAccountName: storage.name
          storageAccountKey: storage.listKeys().keys[0].value
        }
      }
    ]
  }
}

@description('Where ACS delivers: https://FQDN/api/incomingCall, /api/callbacks/..., wss://FQDN/ws.')
output publicFqdn string = fqdn

@description('What agents dial (QUIC, or TCP where UDP is dropped on their side).')
output tunnelAddress string = '${fqdn}:${tunnelPort}'
