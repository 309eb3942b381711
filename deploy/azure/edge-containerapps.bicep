// The acs-relay edge on Azure Container Apps.
//
// Container Apps ingress carries HTTP(S) and TCP, never UDP, so the tunnel runs over the TLS/TCP
// transport: HTTPS ingress (TLS terminated by Container Apps) for ACS on the edge's port 8080,
// and an additional external TCP port for the tunnel. Agents set transport = "tcp".
//
// State (CA, tunnel certificate, agent registry) lives on an Azure Files share mounted with the
// image user's uid and owner-only modes, since the edge refuses private keys others can read.
// An init container creates it on first start (`init --if-missing`).

@description('Region for every resource.')
param location string = resourceGroup().location

@description('Prefix for resource names.')
param name string = 'acs-relay'

@description('The edge image (deploy/docker/build.sh, pushed to your registry).')
param edgeImage string

@description('Registry server hosting the image, e.g. myregistry.azurecr.io.')
param registryServer string

@description('User-assigned identity (resource id) with AcrPull on the registry.')
param registryIdentityId string

@description('TCP port agents dial for the tunnel; also the edge tunnel port in the container.')
param tunnelPort int = 4433

@description('Edge replicas; they share the state share. One is enough to start.')
@minValue(1)
param replicas int = 1

var stateShareName = 'edge-state'

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

resource share 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileService
  name: stateShareName
  properties: {
    shareQuota: 1
  }
}

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${name}-logs'
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: '${name}-edge-env'
  location: location
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logs.properties.customerId
        sharedKey: logs.listKeys().primarySharedKey
      }
    }
  }
}

resource environmentStorage 'Microsoft.App/managedEnvironments/storages@2024-03-01' = {
  parent: environment
  name: 'edgestate'
  properties: {
    azureFile: {
      accountName: storage.name
      accountKey: storage.listKeys().keys[0].value
      shareName: share.name
      accessMode: 'ReadWrite'
    }
  }
}

resource edge 'Microsoft.App/containerApps@2024-03-01' = {
  name: '${name}-edge'
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${registryIdentityId}': {}
    }
  }
  properties: {
    managedEnvironmentId: environment.id
    configuration: {
      activeRevisionsMode: 'Single'
      registries: [
        {
          server: registryServer
          identity: registryIdentityId
        }
      ]
      ingress: {
        external: true
        targetPort: 8080
        transport: 'http'
        allowInsecure: false
        // The tunnel: TCP only (Container Apps ingress carries no UDP).
        additionalPortMappings: [
          {
            external: true
            targetPort: tunnelPort
            exposedPort: tunnelPort
          }
        ]
      }
    }
    template: {
      initContainers: [
        {
          name: 'init'
          image: edgeImage
          args: [
            'init'
            '--if-missing'
            '--name'
            '${name}-edge.${environment.properties.defaultDomain}'
          ]
          resources: {
            cpu: json('0.25')
            memory: '0.5Gi'
          }
          volumeMounts: [
            {
              volumeName: 'state'
              mountPath: '/var/lib/acs-relay'
            }
          ]
        }
      ]
      containers: [
        {
          name: 'edge'
          image: edgeImage
          args: [
            'run'
          ]
          env: [
            {
              name: 'RELAY_EDGE_LISTEN'
              value: '0.0.0.0:8080'
            }
            {
              name: 'RELAY_EDGE_TUNNEL_LISTEN'
              value: '0.0.0.0:${tunnelPort}'
            }
            {
              // Container Apps' ingress sets X-Forwarded-*; it reaches the app from the
              // environment's infrastructure subnet.
              name: 'RELAY_EDGE_TRUSTED_PROXIES'
              value: '100.64.0.0/10,10.0.0.0/8'
            }
          ]
          // Sized from relay-bench: about half a core per 200 concurrent calls.
          resources: {
            cpu: json('1.0')
            memory: '2Gi'
          }
          probes: [
            {
              type: 'Liveness'
              httpGet: {
                path: '/healthz'
                port: 8080
              }
              periodSeconds: 10
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/readyz'
                port: 8080
              }
              periodSeconds: 5
            }
          ]
          volumeMounts: [
            {
              volumeName: 'state'
              mountPath: '/var/lib/acs-relay'
            }
          ]
        }
      ]
      scale: {
        minReplicas: replicas
        maxReplicas: replicas
      }
      volumes: [
        {
          name: 'state'
          storageType: 'AzureFile'
          storageName: environmentStorage.name
          // SMB shows every file as 0777 unless told otherwise; keys must be owner-only.
          mountOptions: 'uid=65532,gid=65532,dir_mode=0700,file_mode=0600,nobrl'
        }
      ]
    }
  }
}

@description('Where ACS delivers: https://FQDN/api/incomingCall, /api/callbacks/..., wss://FQDN/ws.')
output publicFqdn string = edge.properties.configuration.ingress.fqdn

@description('What agents dial (transport = "tcp").')
output tunnelAddress string = '${edge.properties.configuration.ingress.fqdn}:${tunnelPort}'
